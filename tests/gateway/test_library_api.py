"""The Model Library API (/v1/registry) over a real server and a real registry of small
packages: what each project sees, reading versions, manifests and gates, moving aliases (canary
weights, compare-and-swap, gated promotion, rollback), the events naming who, the refusals, and
the gateway's routing following a move at once (the fake clock never moves, so no cache expires
on its own)."""

from __future__ import annotations

import contextlib
import itertools
from pathlib import Path

import pytest
from argon2 import PasswordHasher

from controlplane import identity
from controlplane.access import CLI
from controlplane.db import Database
from registry.registry import Registry
from tests.gateway.conftest import (
    assert_openai_error,
    base_config,
    http,
    make_key,
    openai_client,
    running,
)
from tests.gateway.fakes import FakeClock, FakeLoader
from tests.registry.helpers import write_package

PASSWORD = "correct horse battery"
API = "/v1/registry/models"
_names = itertools.count(1)


class Library:
    """The running gateway, its registry, and the credentials each test acts with."""

    def __init__(self, gw, registry: Registry, config, packages: dict[str, Path], keys, admin_id):
        self.gw, self.registry, self.config, self.packages = gw, registry, config, packages
        self.keys, self.admin_id = keys, admin_id

    def model(self, project: str | None, parity: list[bool], production: int | None = 1) -> str:
        """A new model owned by `project` (None: shared) with a version per entry of `parity`
        (whether its parity report passed), production on `production`."""
        name = f"m{next(_names)}-{project or 'shared'}"
        if project is not None:  # the owner row first, as a fine-tuning worker writes it
            with _database(self.config) as s:
                project_id = identity.project_by_name(s, project).id
                identity.own_model(s, CLI, project_id, name)
        for passed in parity:
            self.registry.push(self.packages["pass" if passed else "fail"], name)
        if production is not None:
            self.registry.set_alias(name, "production", production)
        return name

    def client(self, who: str):
        return http(self.gw, authorization=f"Bearer {self.keys[who][1]}")

    def key_id(self, who: str) -> str:
        return self.keys[who][0].key_id


@contextlib.contextmanager
def _database(config):
    db = Database.open(config.database)
    try:
        with db.session() as s:
            yield s
    finally:
        db.close()


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    root = tmp_path_factory.mktemp("library")
    registry = Registry.open(str(root / "registry"), user="pusher")
    packages = {
        "pass": write_package(root / "pass"),
        "fail": write_package(root / "fail", parity_passed=False, weights=b"bad" * 50),
    }
    config = base_config(root, root / "registry")
    keys = {
        "alpha-admin": make_key(config.database, "alpha", ["models:write", "inference"],
                                role="admin"),
        "alpha-viewer": make_key(config.database, "alpha", ["models:write"], role="viewer"),
        "alpha-reader": make_key(config.database, "alpha", ["models:read"]),
        "beta-admin": make_key(config.database, "beta", ["models:write"], role="admin"),
    }  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        # argon2 at its cheapest: these tests are not about hashing
        mp.setattr(identity, "_HASHER", PasswordHasher(time_cost=1, memory_cost=64,
                                                       parallelism=1))  # fmt: skip
        with _database(config) as s:
            admin = identity.create_user(s, CLI, "root@example.org", "root", PASSWORD,
                                         is_admin=True)  # fmt: skip
        loader = FakeLoader()
        with running(config, loader=loader, clock=FakeClock()) as gw:
            gw.loader = loader
            yield Library(gw, registry, config, packages, keys, admin.id)


def _names_seen(client) -> dict[str, dict]:
    r = client.get(API)
    assert r.status_code == 200, r.text
    return {m["id"]: m for m in r.json()["data"]}


def test_each_project_sees_its_own_models_and_the_shared_ones(library):
    shared = library.model(None, [True])
    mine = library.model("alpha", [True, True])
    theirs = library.model("beta", [True])
    library.registry.set_alias(mine, "canary", 2, weight=0.1)
    with library.client("alpha-reader") as alpha, library.client("beta-admin") as beta:
        seen = _names_seen(alpha)
        assert {shared, mine} <= set(seen) and theirs not in seen
        assert seen[shared]["owner"] is None
        assert seen[mine]["owner"] == seen[mine]["owner"] and seen[mine]["owner"]
        assert seen[mine]["latest_version"] == 2 and seen[mine]["versions"] == 2
        canary = seen[mine]["aliases"]["canary"]
        assert (canary["version"], canary["weight"], canary["updated_by"]) == (2, 0.1, "pusher")
        assert seen[mine]["aliases"]["production"]["version"] == 1
        seen = _names_seen(beta)
        assert {shared, theirs} <= set(seen) and mine not in seen
        assert seen[theirs]["owner"] != _names_seen(alpha)[mine]["owner"]

        # another project's model is the 404 of a missing one, on every route
        for path in ("", "/versions/1", "/versions/1/gates", "/events"):
            hidden = assert_openai_error(beta.get(f"{API}/{mine}{path}"), 404, "not_found", "name")
            missing = assert_openai_error(beta.get(f"{API}/nope{path}"), 404, "not_found", "name")
            assert hidden["message"] == missing["message"].replace("nope", mine)
        r = beta.post(f"{API}/{mine}/promote", json={"version": 2, "alias": "production"})
        assert_openai_error(r, 404, "not_found", "name")


def test_a_model_its_versions_manifest_and_gates_read_without_moving_anything(library):
    name = library.model("alpha", [True, False])
    with library.client("alpha-reader") as h:
        r = h.get(f"{API}/{name}")
        assert r.status_code == 200, r.text
        model = r.json()
        assert [v["version"] for v in model["versions"]] == [1, 2]
        assert [v["parity_passed"] for v in model["versions"]] == [True, False]
        assert model["versions"][0]["targets"] == ["onnx-fp32"]
        assert set(model["versions"][0]["lineage"]) == {
            "job", "base_model", "training_file_sha256", "dataset_sha256"
        }  # fmt: skip
        assert {"production", "canary", "staging"} <= set(model["gates"])
        assert model["gates"]["production"]["parity"] is True
        assert model["can_write"] is False  # a models:read key

        r = h.get(f"{API}/{name}/versions/2")
        assert r.status_code == 200, r.text
        manifest = r.json()["manifest"]
        assert manifest["reports"]["parity"]["onnx-fp32"]["passed"] is False
        assert manifest["artifacts"][0]["target"] == "onnx-fp32"
        assert "generation" in manifest and "lineage" in manifest
        assert_openai_error(h.get(f"{API}/{name}/versions/9"), 404, "not_found", "version")

        r = h.get(f"{API}/{name}/versions/2/gates", params={"alias": "production"})
        assert r.status_code == 200, r.text
        check = r.json()
        assert (check["passed"], check["current_version"]) == (False, 1)
        failed = [g for g in check["data"] if not g["passed"]]
        assert [g["gate"] for g in failed] == ["parity"]
        assert "greedy tokens diverged" in failed[0]["detail"]
        r = h.get(f"{API}/{name}/versions/1/gates", params={"alias": "staging"})
        assert r.json()["passed"] is True and r.json()["current_version"] is None
        assert_openai_error(h.get(f"{API}/{name}/versions/1/gates", params={"alias": "a/b"}),
                            400, "invalid_value", "alias")  # fmt: skip
    assert library.registry.alias(name, "production")[0].version == 1
    with library.client("alpha-admin") as h:
        assert h.get(f"{API}/{name}").json()["can_write"] is True


def test_a_canary_weight_by_compare_and_swap(library):
    name = library.model("alpha", [True, True])
    url = f"{API}/{name}/aliases/canary"
    with library.client("alpha-admin") as h:
        r = h.post(url, json={"version": 2, "weight": 0.25, "expect": 0})
        assert r.status_code == 200, r.text
        assert r.json() | {"gates": []} == {
            "object": "registry.alias_move", "model": name, "alias": "canary",
            "from_version": None, "version": 2, "changed": True, "weight": 0.25, "gates": [],
        }  # fmt: skip
        r = h.post(url, json={"version": 1, "weight": 0.5, "expect": 0})
        error = assert_openai_error(r, 409, "conflict", "expect")
        assert "points to 2" in error["message"]
        r = h.post(url, json={"version": 2, "weight": 0.5, "expect": 2})
        assert r.status_code == 200 and r.json()["from_version"] == 2, r.text
        error = assert_openai_error(h.post(url, json={"version": 2, "weight": 1.5}), 400,
                                    "invalid_value", "weight")  # fmt: skip
        assert "weight" in error["message"] and "<= 1" in error["message"]
        assert_openai_error(h.post(url, json={"version": 7}), 404, "not_found", "version")
        assert_openai_error(h.post(url, json={"version": 2, "force": True}), 400,
                            "invalid_value", "force")  # fmt: skip
        canary = _names_seen(h)[name]["aliases"]["canary"]
    assert (canary["version"], canary["weight"]) == (2, 0.5)
    assert canary["updated_by"] == f"key:{library.key_id('alpha-admin')}"


def test_promotion_passes_or_names_the_failed_gate_and_rollback_returns(library):
    name = library.model("alpha", [True, True, False])
    with library.client("alpha-admin") as h:
        r = h.post(f"{API}/{name}/promote", json={"version": 2, "alias": "production"})
        assert r.status_code == 200, r.text
        move = r.json()
        assert (move["from_version"], move["version"], move["changed"]) == (1, 2, True)
        assert {g["gate"] for g in move["gates"]} == {"parity", "perplexity"}
        assert all(g["passed"] for g in move["gates"])

        r = h.post(f"{API}/{name}/promote", json={"version": 3, "alias": "production"})
        assert r.status_code == 422, r.text
        body = r.json()
        assert set(body) == {"error", "gates"}
        assert body["error"]["code"] == "gate_failed" and body["error"]["param"] == "version"
        assert "refused by gate parity" in body["error"]["message"]
        assert [g["gate"] for g in body["gates"]] == ["parity"]
        assert body["gates"][0]["passed"] is False
        # a plain alias move is held to the same gates: no way around them over HTTP
        r = h.post(f"{API}/{name}/aliases/production", json={"version": 3})
        assert r.status_code == 422 and "parity" in r.json()["error"]["message"], r.text
        assert library.registry.alias(name, "production")[0].version == 2

        r = h.post(f"{API}/{name}/rollback", json={"alias": "production"})
        assert r.status_code == 200, r.text
        assert (r.json()["from_version"], r.json()["version"]) == (2, 1)
        error = assert_openai_error(h.post(f"{API}/{name}/rollback", json={"alias": "production"}),
                                    400, "invalid_value", "alias")  # fmt: skip
        assert "no earlier target" in error["message"]
        assert_openai_error(h.post(f"{API}/{name}/rollback", json={"alias": "nope"}), 404,
                            "not_found", "alias")  # fmt: skip
    assert library.registry.alias(name, "production")[0].version == 1


def test_events_name_who_newest_first_a_page_at_a_time(library):
    name = library.model("alpha", [True, True])
    who = f"key:{library.key_id('alpha-admin')}"
    with library.client("alpha-admin") as h:
        assert h.post(
            f"{API}/{name}/promote", json={"version": 2, "alias": "production"}
        ).is_success
        assert h.post(f"{API}/{name}/rollback", json={"alias": "production"}).is_success
        r = h.get(f"{API}/{name}/events")
        assert r.status_code == 200, r.text
        events = r.json()["data"]
        assert [e["action"] for e in events] == ["rollback", "promote", "alias", "push", "push"]
        assert [e["who"] for e in events[:2]] == [who, who]
        assert events[2]["who"] == "pusher"
        assert events[1]["gates"] and events[1]["from_version"] == 1
        page = h.get(f"{API}/{name}/events", params={"limit": 2}).json()
        assert [e["id"] for e in page["data"]] == [e["id"] for e in events[:2]]
        assert page["has_more"] is True and page["last_id"] == events[1]["id"]
        rest = h.get(f"{API}/{name}/events", params={"limit": 5, "after": page["last_id"]}).json()
        assert [e["id"] for e in rest["data"]] == [e["id"] for e in events[2:]]
        assert rest["has_more"] is False
        assert_openai_error(h.get(f"{API}/{name}/events", params={"limit": 0}), 400,
                            "invalid_value", "limit")  # fmt: skip
        assert_openai_error(h.get(f"{API}/{name}/events", params={"after": "nope"}), 400,
                            "invalid_value", "after")  # fmt: skip


def test_who_may_move_aliases(library):
    mine = library.model("alpha", [True, True])
    shared = library.model(None, [True, True])
    body = {"version": 2, "alias": "production"}
    with library.client("alpha-viewer") as h:  # a viewer's key, even with the scope
        assert_openai_error(h.post(f"{API}/{mine}/promote", json=body), 403, "forbidden")
    with library.client("alpha-reader") as h:  # a key without models:write
        assert_openai_error(h.post(f"{API}/{mine}/promote", json=body), 403, "missing_scope")
        assert_openai_error(h.post(f"{API}/{mine}/rollback", json={"alias": "production"}),
                            403, "missing_scope")  # fmt: skip
    with library.client("alpha-admin") as h:  # a project admin, but the model is everyone's
        error = assert_openai_error(h.post(f"{API}/{shared}/promote", json=body), 403,
                                    "forbidden")  # fmt: skip
        assert "shared model" in error["message"] and "platform admin" in error["message"]
        assert h.get(f"{API}/{shared}").json()["can_write"] is False
    assert library.registry.alias(mine, "production")[0].version == 1
    assert library.registry.alias(shared, "production")[0].version == 1

    with http(library.gw) as h:  # a platform admin, signed in
        login = {"email": "root@example.org", "password": PASSWORD}
        r = h.post("/v1/auth/login", json=login)
        assert r.status_code == 200, r.text
        assert_openai_error(h.post(f"{API}/{shared}/promote", json=body), 403, "forbidden")
        h.headers["X-CSRF-Token"] = r.json()["csrf_token"]
        r = h.post(f"{API}/{shared}/promote", json=body)
        assert r.status_code == 200, r.text
        event = h.get(f"{API}/{shared}/events", params={"limit": 1}).json()["data"][0]
    assert event["who"] == f"user:{library.admin_id}" and event["action"] == "promote"


def _served_by(library, client, name: str, ref: str) -> bool:
    """Whether a completion of `name` now is served by the engine of `ref` ("name:version")."""
    loader = library.gw.loader
    engine = loader.engines.get(ref)
    before = len(engine.submitted) if engine else 0
    client.completions.create(model=name, prompt="x", max_tokens=1)
    now = loader.engines.get(ref)
    return now is not None and (now is not engine or len(now.submitted) > before)


def test_routing_follows_a_move_at_once(library):
    name = library.model("alpha", [True, True])
    client = openai_client(library.gw, library.keys["alpha-admin"][1])
    assert _served_by(library, client, name, f"{name}:1")
    with library.client("alpha-admin") as h:
        r = h.post(f"{API}/{name}/promote", json={"version": 2, "alias": "production"})
        assert r.status_code == 200, r.text
    assert _served_by(library, client, name, f"{name}:2")
    with library.client("alpha-admin") as h:  # every request to the canary
        r = h.post(f"{API}/{name}/aliases/canary", json={"version": 1, "weight": 1.0})
        assert r.status_code == 200, r.text
    assert _served_by(library, client, name, f"{name}:1")
