"""The control plane over HTTP, through a real server: sign-in (cookie flags, CSRF, logout, one
answer for a wrong email or password), the permission matrix of every role × every project,
member and key action (generated from controlplane.access.ROLE_ACTIONS), isolation between
projects (404, never 403), keys made and revoked through the API, and models of a project."""

from __future__ import annotations

import contextlib
import itertools

import pytest
from argon2 import PasswordHasher

from controlplane import identity
from controlplane.access import ACTIONS, CLI, ROLE_ACTIONS, ROLES
from controlplane.db import Database
from controlplane.keys import create_key
from controlplane.models import ModelOwner
from gateway.app import GatewayConfig
from tests.controlplane.conftest import postgres_url  # noqa: F401 (a fixture)
from tests.gateway.conftest import (
    assert_openai_error,
    base_config,
    http,
    running,
)
from tests.gateway.fakes import FakeClock

PASSWORD = "correct horse battery"
PEOPLE = (*ROLES, "outsider", "extra")  # one person per role, one in no project, one to add
_names = itertools.count()


@pytest.fixture(scope="module")
def gw(tmp_path_factory, tiny_registry):
    """A gateway with people (so sign-in is required), each signed in on demand."""
    config = base_config(tmp_path_factory.mktemp("control"), tiny_registry)
    with pytest.MonkeyPatch.context() as mp:  # argon2id with its cheapest parameters
        mp.setattr(identity, "_HASHER", PasswordHasher(time_cost=1, memory_cost=64, parallelism=1))
        db = Database.open(config.database)
        db.upgrade()
        with db.session() as s:
            identity.create_user(s, CLI, "root@example.org", "root", PASSWORD, is_admin=True)
            for name in PEOPLE:
                identity.create_user(s, CLI, f"{name}@example.org", name, PASSWORD)
        db.close()
        with running(config) as g:
            assert not g.state.open_access
            yield g


@contextlib.contextmanager
def sign_in(gw, name: str):
    """An HTTP client holding `name`'s session cookie and sending its CSRF token."""
    with http(gw) as client:
        body = {"email": f"{name}@example.org", "password": PASSWORD}
        r = client.post("/v1/auth/login", json=body)
        assert r.status_code == 200, r.text
        client.headers["X-CSRF-Token"] = r.json()["csrf_token"]
        yield client


def user_id(gw, name: str) -> str:
    with gw.state.db.session() as s:
        return identity.user_by_email(s, f"{name}@example.org").id


def new_project(gw, members: dict[str, str]) -> str:
    """A fresh project with these members ({person: role}); an owner is always among them."""
    with gw.state.db.session() as s:
        project = identity.create_project(s, CLI, f"p{next(_names)}")
        for name, role in ({"owner": "owner"} | members).items():
            identity.add_member(s, CLI, project.id, f"{name}@example.org", role)
    return project.id


# ── sign-in ──


def test_login_sets_a_safe_cookie_and_returns_the_csrf_token(gw):
    with http(gw) as h:
        r = h.post("/v1/auth/login", json={"email": "Viewer@Example.org", "password": PASSWORD})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["user"]["email"] == "viewer@example.org" and body["csrf_token"]
        cookie = r.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=lax" in cookie and "path=/" in cookie
        assert "secure" not in cookie  # plain http: a Secure cookie would never come back
        assert "max-age=43200" in cookie  # the session's 12 hours (GatewayConfig.session_ttl_s)
        assert h.get("/v1/auth/me").json()["user"]["email"] == "viewer@example.org"
        r = h.post("/v1/auth/login", json={"email": "viewer@example.org", "password": PASSWORD},
                   headers={"X-Forwarded-Proto": "https"})  # fmt: skip
        assert "secure" in r.headers["set-cookie"].lower()


def test_a_session_lasts_a_minute_to_30_days():
    for hours in (0.01, 24 * 31):
        with pytest.raises(ValueError, match=r"session_ttl_s = .* must be in \[60, 2592000\]"):
            GatewayConfig(registry="r", session_ttl_s=hours * 3600)


def test_login_takes_a_form_too(gw):
    with http(gw) as h:
        r = h.post("/v1/auth/login", data={"email": "viewer@example.org", "password": PASSWORD})
        assert r.status_code == 200, r.text
        token = r.json()["csrf_token"]
        # an HTML form carries the CSRF token as a field
        r = h.post("/v1/auth/logout", data={"csrf_token": token})
        assert r.status_code == 200, r.text
        assert_openai_error(h.get("/v1/auth/me"), 401)


def test_a_wrong_email_or_password_is_one_401_that_says_neither(gw):
    messages = set()
    with http(gw) as h:
        for email, password in (("viewer@example.org", "wrong password"),
                                ("nobody@example.org", PASSWORD)):  # fmt: skip
            r = h.post("/v1/auth/login", json={"email": email, "password": password})
            messages.add(assert_openai_error(r, 401, "unauthenticated")["message"])
            assert "set-cookie" not in r.headers
        assert_openai_error(h.post("/v1/auth/login", json={"email": "x"}), 400)
    assert messages == {"wrong email or password"}


def test_state_changes_by_cookie_need_the_csrf_token(gw):
    with sign_in(gw, "owner") as h:
        token = h.headers.pop("X-CSRF-Token")
        error = assert_openai_error(h.post("/v1/projects", json={"name": "nocsrf"}), 403)
        assert "X-CSRF-Token".lower() in error["message"].lower()
        bad = {"X-CSRF-Token": token[:-1] + ("A" if token[-1] != "A" else "B")}
        assert_openai_error(h.post("/v1/projects", json={"name": "nocsrf"}, headers=bad), 403)
        assert h.get("/v1/projects").status_code == 200  # reading needs none
        r = h.post("/v1/projects", json={"name": f"csrf{next(_names)}"},
                   headers={"X-CSRF-Token": token})  # fmt: skip
        assert r.status_code == 201 and r.json()["role"] == "owner"


def test_logout_ends_the_session(gw):
    with sign_in(gw, "developer") as h:
        assert h.get("/v1/auth/me").status_code == 200
        copy = h.cookies.get("aimass_session")  # a stolen copy of the cookie is worthless after
        r = h.post("/v1/auth/logout")
        assert r.status_code == 200 and "max-age=0" in r.headers["set-cookie"].lower()
        with http(gw) as other:
            other.cookies.set("aimass_session", copy)
            assert_openai_error(other.get("/v1/auth/me"), 401, "unauthenticated")


# ── the permission matrix ──

# one request per control-plane action of a project: (method, path, body); {p} is the project
REQUESTS = {
    "project:read": ("GET", "/v1/projects/{p}", None),
    "project:write": ("PATCH", "/v1/projects/{p}", {"name": "renamed-{n}"}),
    "project:delete": ("DELETE", "/v1/projects/{p}", None),
    "members:read": ("GET", "/v1/projects/{p}/members", None),
    "members:manage": (
        "POST",
        "/v1/projects/{p}/members",
        {"email": "extra@example.org", "role": "viewer"},
    ),  # fmt: skip
    "members:owner": (
        "POST",
        "/v1/projects/{p}/members",
        {"email": "extra@example.org", "role": "owner"},
    ),  # fmt: skip
    "keys:create": ("POST", "/v1/projects/{p}/api_keys", {"scopes": ["models:read"]}),
    "keys:manage": ("GET", "/v1/projects/{p}/api_keys", None),
}
CONTROL_ACTIONS = sorted(a for a in ACTIONS if a.split(":")[0] in ("project", "members", "keys"))


def test_the_matrix_covers_every_project_member_and_key_action():
    assert sorted(REQUESTS) == CONTROL_ACTIONS


def send(h, action: str, project_id: str):
    method, path, body = REQUESTS[action]
    n = next(_names)
    if body is not None:
        body = {k: v.format(n=n) if isinstance(v, str) else v for k, v in body.items()}
    return h.request(method, path.format(p=project_id), json=body)


@pytest.mark.parametrize("action", CONTROL_ACTIONS)
@pytest.mark.parametrize("role", ROLES)
def test_each_role_may_do_what_its_row_says(gw, role, action):
    project = new_project(gw, {} if role == "owner" else {role: role})
    with sign_in(gw, role) as h:
        r = send(h, action, project)
    if action in ROLE_ACTIONS[role]:
        assert 200 <= r.status_code < 300, r.text
    else:
        assert_openai_error(r, 403, "forbidden")


@pytest.mark.parametrize("action", CONTROL_ACTIONS)
def test_a_non_member_gets_404_for_everything(gw, action):
    project = new_project(gw, {})
    with sign_in(gw, "outsider") as h:
        error = assert_openai_error(send(h, action, project), 404, "not_found")
    assert project in error["message"]


# ── keys through the API ──


def test_keys_made_through_the_api_work_and_stop_at_revocation(gw):
    project = new_project(gw, {"developer": "developer"})
    with sign_in(gw, "developer") as h:
        r = h.post(f"/v1/projects/{project}/api_keys",
                   json={"scopes": ["inference", "models:read"], "name": "ci"})  # fmt: skip
        assert r.status_code == 201, r.text
        created = r.json()
        assert created["key"].startswith(f"aim_{created['id']}_") and created["role"] == "developer"
        assert_openai_error(
            h.post(f"/v1/projects/{project}/api_keys", json={"scopes": ["admin"], "role": "owner"}),
            400, "invalid_value", "role",
        )  # fmt: skip
    key = {"Authorization": f"Bearer {created['key']}"}
    with http(gw, **key) as k:
        assert k.get("/v1/models").status_code == 200
    with sign_in(gw, "owner") as h:
        listed = h.get(f"/v1/projects/{project}/api_keys").json()["data"]
        assert [x["id"] for x in listed] == [created["id"]] and "key" not in listed[0]
        assert created["key"] not in h.get(f"/v1/projects/{project}/api_keys").text
        r = h.delete(f"/v1/projects/{project}/api_keys/{created['id']}")
        assert r.status_code == 200 and r.json()["revoked_at"]
        again = h.post(f"/v1/projects/{project}/api_keys/{created['id']}/revoke")
        assert again.json()["revoked_at"] == r.json()["revoked_at"]
    with http(gw, **key) as k:  # revoked through this replica: at once
        error = assert_openai_error(k.get("/v1/models"), 401, "invalid_api_key")
    assert "was revoked at" in error["message"]


def test_a_viewers_key_is_refused_what_its_scopes_name_but_its_role_lacks(gw):
    project = new_project(gw, {})
    with gw.state.db.session() as s:  # the key of a viewer of `project`
        _, key = create_key(s, CLI, project, ["admin"], role="viewer")
    with http(gw, Authorization=f"Bearer {key}") as k:
        assert k.get(f"/v1/projects/{project}/members").status_code == 200  # viewer: may read
        r = k.post(f"/v1/projects/{project}/members",
                   json={"email": "extra@example.org", "role": "viewer"})  # fmt: skip
        error = assert_openai_error(r, 403, "forbidden")
        assert "role viewer" in error["message"]
        assert_openai_error(k.get("/v1/users"), 403, "missing_scope")  # no scope grants it


# ── isolation ──


def test_a_key_or_member_of_one_project_never_sees_anothers(gw):
    a, b = new_project(gw, {"developer": "developer"}), new_project(gw, {"viewer": "viewer"})
    with gw.state.db.session() as s:
        _, key_a = create_key(s, CLI, a, ["admin", "inference", "models:read"])
        identity.own_model(s, CLI, b, "tiny")  # the registry's model is b's now
    gw.state.model_owners.forget()  # made here: no need to wait out the 5 s snapshot
    try:
        with http(gw, Authorization=f"Bearer {key_a}") as k:
            for path in (f"/v1/projects/{b}", f"/v1/projects/{b}/members",
                         f"/v1/projects/{b}/api_keys"):  # fmt: skip
                assert_openai_error(k.get(path), 404, "not_found")
            assert [p["id"] for p in k.get("/v1/projects").json()["data"]] == [a]
            assert "tiny" not in {m["id"] for m in k.get("/v1/models").json()["data"]}
            for spelling, missing in (("tiny", "nope"), ("tiny:1", "nope:1"),
                                      ("tiny@production", "nope@production")):  # fmt: skip
                body = {"model": spelling, "prompt": "x", "max_tokens": 1}
                hidden = assert_openai_error(k.post("/v1/completions", json=body), 404,
                                             "model_not_found")  # fmt: skip
                body["model"] = missing
                absent = k.post("/v1/completions", json=body).json()["error"]
                assert hidden["message"] == absent["message"].replace("nope", "tiny")
        with sign_in(gw, "developer") as h:  # a member of a, not of b
            assert "tiny" not in {m["id"] for m in h.get("/v1/models").json()["data"]}
            assert_openai_error(h.get(f"/v1/projects/{b}/members"), 404)
        with sign_in(gw, "owner") as h:  # b's owner sees it
            assert "tiny" in {m["id"] for m in h.get("/v1/models").json()["data"]}
        with sign_in(gw, "viewer") as h:  # b's viewer sees it, and may not generate with it
            assert "tiny" in {m["id"] for m in h.get("/v1/models").json()["data"]}
            body = {"model": "tiny", "prompt": "x", "max_tokens": 1}
            assert_openai_error(h.post("/v1/completions", json=body), 403, "forbidden")
    finally:
        with gw.state.db.session() as s:
            s.delete(s.get(ModelOwner, "tiny"))
        gw.state.model_owners.forget()


# ── people ──


def test_platform_admins_manage_people(gw):
    with sign_in(gw, "owner") as h:  # a project owner is no platform admin
        assert_openai_error(h.get("/v1/users"), 403, "forbidden")
    with sign_in(gw, "root") as h:
        r = h.post("/v1/users", json={"email": "New@Example.org", "display_name": "New",
                                      "password": PASSWORD})  # fmt: skip
        assert r.status_code == 201 and r.json()["email"] == "new@example.org"
        assert "password" not in r.text.replace('"password"', "")
        assert_openai_error(h.post("/v1/users", json={"email": "new@example.org",
                                                      "display_name": "Twin",
                                                      "password": PASSWORD}), 409, "conflict")  # fmt: skip
        assert_openai_error(h.post("/v1/users", json={"email": "x@y.org", "display_name": "X",
                                                      "password": "short"}), 400, "invalid_value",
                            "password")  # fmt: skip
        emails = {u["email"] for u in h.get("/v1/users").json()["data"]}
        assert {"root@example.org", "new@example.org"} <= emails
        with sign_in(gw, "new") as new:
            assert new.get("/v1/auth/me").status_code == 200
            assert h.post(f"/v1/users/{r.json()['id']}/disable").json()["disabled_at"]
            assert_openai_error(new.get("/v1/auth/me"), 401)  # its sessions ended


# ── two replicas on one PostgreSQL ──


@pytest.mark.slow
def test_two_replicas_share_keys_and_revocation_reaches_both(
    tmp_path,
    tiny_registry,
    postgres_url,  # noqa: F811 (the fixture imported above)
    monkeypatch,
):
    """A key made through one gateway works on the other; revoked through the first, it stops
    there at once and on the second within its cache's 5 s (its clock, advanced by the test)."""
    monkeypatch.setattr(
        identity, "_HASHER", PasswordHasher(time_cost=1, memory_cost=64, parallelism=1)
    )
    db = Database.open(postgres_url)
    db.upgrade()
    with db.session() as s:
        identity.create_user(s, CLI, "root@example.org", "root", PASSWORD, is_admin=True)
    db.close()
    config = base_config(tmp_path, tiny_registry, database=postgres_url)
    clock = FakeClock()
    with running(config) as a, running(config, clock=clock) as b, sign_in(a, "root") as h:
        project = h.post("/v1/projects", json={"name": "shared"}).json()["id"]
        r = h.post(f"/v1/projects/{project}/api_keys", json={"scopes": ["models:read"]})
        created = r.json()
        key = {"Authorization": f"Bearer {created['key']}"}
        with http(a, **key) as on_a, http(b, **key) as on_b:
            assert on_a.get("/v1/models").status_code == on_b.get("/v1/models").status_code == 200
            h.delete(f"/v1/projects/{project}/api_keys/{created['id']}")
            assert_openai_error(on_a.get("/v1/models"), 401, "invalid_api_key")  # at once
            assert on_b.get("/v1/models").status_code == 200  # b trusts its cache ...
            clock.advance(5.0)
            assert_openai_error(on_b.get("/v1/models"), 401, "invalid_api_key")  # ... 5 s at most
