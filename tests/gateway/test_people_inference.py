"""A signed-in person's own generation requests, through a real server: they act for the
project their OpenAI-Project header names, where they need the `inference` action; the tokens
are quota-checked and metered under that project with key id ""; rate limits are per person.
Open access stays unmetered."""

from __future__ import annotations

import contextlib

import pytest
from argon2 import PasswordHasher
from sqlalchemy import select

from controlplane import identity
from controlplane.access import CLI
from controlplane.db import Database
from controlplane.models import Usage
from controlplane.quotas import set_quotas
from controlplane.settings import set_value
from tests.gateway.conftest import assert_openai_error, base_config, http, make_key, running
from tests.gateway.fakes import FakeCatalog, FakeLoader

PASSWORD = "correct horse battery"
COMPLETION = {"model": "tiny", "prompt": "The cat", "max_tokens": 3}


@pytest.fixture
def config(tmp_path, monkeypatch):
    """People and projects: dev is a developer of alpha and beta, viewer a viewer of alpha,
    outsider in no project (argon2 at its cheapest: these tests are not about hashing)."""
    monkeypatch.setattr(identity, "_HASHER", PasswordHasher(time_cost=1, memory_cost=64,
                                                            parallelism=1))  # fmt: skip
    config = base_config(tmp_path, tmp_path / "registry", usage_flush_s=3600)
    db = Database.open(config.database)
    db.upgrade()
    with db.session() as s:
        for name in ("dev", "viewer", "outsider"):
            identity.create_user(s, CLI, f"{name}@example.org", name, PASSWORD)
        for project, members in (("alpha", {"dev": "developer", "viewer": "viewer"}),
                                 ("beta", {"dev": "developer"})):  # fmt: skip
            p = identity.create_project(s, CLI, project)
            for name, role in members.items():
                identity.add_member(s, CLI, p.id, f"{name}@example.org", role)
    db.close()
    return config


def _serve(config):
    """The gateway over a fake registry and engines: these tests are about who pays."""
    return running(config, catalog=FakeCatalog({"tiny": 1}, production=1), loader=FakeLoader())


@contextlib.contextmanager
def _signed_in(gw, name: str, project: str | None = None):
    """An HTTP client with `name`'s session cookie, CSRF token and (given) OpenAI-Project."""
    with http(gw) as client:
        body = {"email": f"{name}@example.org", "password": PASSWORD}
        r = client.post("/v1/auth/login", json=body)
        assert r.status_code == 200, r.text
        client.headers["X-CSRF-Token"] = r.json()["csrf_token"]
        if project is not None:
            client.headers["OpenAI-Project"] = project
        yield client


def _with(config, work):
    """`work(db)` on the gateway's database, outside the gateway."""
    db = Database.open(config.database)
    try:
        with db.session() as s:
            return work(s)
    finally:
        db.close()


def _project_id(config, name: str) -> str:
    return _with(config, lambda s: identity.project_by_name(s, name).id)


def _usage(config) -> list[tuple]:
    """Every usage row as (project, key id, model, requests, prompt, completion tokens)."""
    return _with(config, lambda s: sorted(
        (u.project_id, u.key_id, u.model, u.requests, u.prompt_tokens, u.completion_tokens)
        for u in s.scalars(select(Usage))
    ))  # fmt: skip


def test_a_persons_requests_are_metered_under_the_project_they_name(config):
    alpha, beta = _project_id(config, "alpha"), _project_id(config, "beta")
    with _serve(config) as gw, _signed_in(gw, "dev", "alpha") as h:  # the project by name
        r = h.post("/v1/completions", json=COMPLETION)
        assert r.status_code == 200, r.text
        first = r.json()["usage"]
        chat = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": 2}  # fmt: skip
        r = h.post("/v1/chat/completions", json=chat, headers={"OpenAI-Project": beta})
        assert r.status_code == 200, r.text  # the project by id
        second = r.json()["usage"]
    # the gateway stopped cleanly: everything is written
    assert _usage(config) == sorted([
        (alpha, "", "tiny", 1, first["prompt_tokens"], first["completion_tokens"]),
        (beta, "", "tiny", 1, second["prompt_tokens"], second["completion_tokens"]),
    ])  # fmt: skip


def test_a_person_without_the_project_header_gets_a_400_naming_it(config):
    with _serve(config) as gw, _signed_in(gw, "dev") as h:
        for path, body in (("/v1/completions", COMPLETION),
                           ("/v1/chat/completions", {"model": "tiny", "messages": [
                               {"role": "user", "content": "Hi"}]})):  # fmt: skip
            error = assert_openai_error(h.post(path, json=body), 400, param="OpenAI-Project")
            assert "OpenAI-Project header" in error["message"]
    assert _usage(config) == []


def test_a_project_the_person_is_outside_of_is_absent_and_a_viewer_may_not_generate(config):
    alpha = _project_id(config, "alpha")
    with _serve(config) as gw:
        with _signed_in(gw, "outsider") as h:
            for named in ("alpha", alpha, "nowhere"):
                r = h.post("/v1/completions", json=COMPLETION, headers={"OpenAI-Project": named})
                error = assert_openai_error(r, 404, "not_found", "OpenAI-Project")
                assert error["message"] == f"no project {named!r}"  # no id for a name given
        with _signed_in(gw, "viewer", "alpha") as h:
            error = assert_openai_error(h.post("/v1/completions", json=COMPLETION), 403)
            assert "viewer may not inference" in error["message"]
    assert _usage(config) == []


def test_a_persons_used_up_quota_is_a_429(config):
    _with(config, lambda s: set_quotas(s, CLI, identity.project_by_name(s, "alpha").id,
                                       {"tokens_per_day": 5}))  # fmt: skip
    with _serve(config) as gw, _signed_in(gw, "dev", "alpha") as h:
        assert h.post("/v1/completions", json=COMPLETION).status_code == 200  # uses > 5
        error = assert_openai_error(h.post("/v1/completions", json=COMPLETION), 429,
                                    "quota_exceeded")  # fmt: skip
        assert "tokens_per_day quota of 5" in error["message"]
        # beta has no quota: the same person acting for it is served
        r = h.post("/v1/completions", json=COMPLETION, headers={"OpenAI-Project": "beta"})
        assert r.status_code == 200, r.text


def test_a_persons_rate_limit_is_theirs_whatever_the_project(config):
    _with(config, lambda s: set_value(s, CLI, "requests_per_minute", 1))
    _, key = make_key(config.database, "alpha", ["inference"])
    with _serve(config) as gw:
        with _signed_in(gw, "dev", "alpha") as h:
            assert h.post("/v1/completions", json=COMPLETION).status_code == 200
            r = h.post("/v1/completions", json=COMPLETION, headers={"OpenAI-Project": "beta"})
            error = assert_openai_error(r, 429)
            assert "1 requests per minute" in error["message"]
        # another caller of the same project has a bucket of their own
        with http(gw, authorization=f"Bearer {key}") as k:
            assert k.post("/v1/completions", json=COMPLETION).status_code == 200


def test_a_key_may_name_only_its_own_project(config):
    record, key = make_key(config.database, "alpha", ["inference"])
    with _serve(config) as gw, http(gw, authorization=f"Bearer {key}") as k:
        for own in ("alpha", record.project_id):
            r = k.post("/v1/completions", json=COMPLETION, headers={"OpenAI-Project": own})
            assert r.status_code == 200, r.text
        r = k.post("/v1/completions", json=COMPLETION, headers={"OpenAI-Project": "beta"})
        assert_openai_error(r, 404, "not_found", "OpenAI-Project")
    assert [(p, k_id, n) for p, k_id, _, n, _, _ in _usage(config)] == [
        (record.project_id, record.key_id, 2)
    ]


def test_open_access_is_not_metered(tmp_path):
    config = base_config(tmp_path, tmp_path / "registry", usage_flush_s=3600)
    with _serve(config) as gw, http(gw) as h:
        assert gw.state.open_access
        for project in (None, "alpha"):  # a header changes nothing: no project is charged
            headers = {"OpenAI-Project": project} if project else {}
            r = h.post("/v1/completions", json=COMPLETION, headers=headers)
            assert r.status_code == 200, r.text
    assert _usage(config) == []
