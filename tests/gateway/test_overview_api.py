"""GET /v1/overview through a real gateway (uvicorn on a free port, a real SQLite file, the tiny
model): completions show up in the hour's minutes and the time to first token, the loaded model
with its health and load time, queued and running jobs counted; each caller sees only the
projects it may read, and a platform admin the whole platform."""

from __future__ import annotations

import json
import time

import openai
import pytest
from argon2 import PasswordHasher

from controlplane import identity, jobs
from controlplane.access import CLI
from controlplane.db import Database
from controlplane.identity import project_by_name
from tests.gateway.conftest import (
    assert_openai_error,
    base_config,
    http,
    make_key,
    openai_client,
    running,
    wait_for,
)
from tests.gateway.fakes import FakeCatalog, FakeLoader

PASSWORD = "correct horse battery"
SCOPES = ["inference", "admin", "train"]


@pytest.fixture
def config(tmp_path, tiny_registry):
    return base_config(tmp_path, tiny_registry, usage_flush_s=0.1)


def _complete(key: str, gw, n: int) -> tuple[int, int]:
    """`n` completions; (requests, prompt + completion tokens) they used."""
    client = openai_client(gw, key)
    done = [client.completions.create(model="tiny", prompt="The cat", max_tokens=4)
            for _ in range(n)]  # fmt: skip
    return n, sum(c.usage.prompt_tokens + c.usage.completion_tokens for c in done)


def _hour(body: dict) -> tuple[int, int]:
    return sum(m["requests"] for m in body["minutes"]), sum(m["tokens"] for m in body["minutes"])


def _overview_when(h, want: tuple[int, int], **params) -> dict:
    """The overview once the usage table holds `want` (requests, tokens) for the caller."""

    def counted():
        r = h.get("/v1/overview", params=params)
        assert r.status_code == 200, r.text
        return r.json() if _hour(r.json()) == want else None

    return wait_for(counted, timeout=10)


def test_the_overview_shows_the_hour_the_model_and_ttft(config):
    started = time.time()
    _, key = make_key(config.database, "alpha", SCOPES)
    with running(config) as gw, http(gw, authorization=f"Bearer {key}") as h:
        want = _complete(key, gw, 3)
        body = _overview_when(h, want)
    assert body["object"] == "overview" and body["project_id"] is None
    minutes = body["minutes"]
    assert len(minutes) == 60
    starts = [m["start_time"] for m in minutes]
    assert starts == list(range(starts[0], starts[0] + 3600, 60))
    assert minutes[-1]["start_time"] <= body["created_at"] < minutes[-1]["start_time"] + 60
    assert body["error_rate"] == 0
    [model] = body["models"]
    assert (model["name"], model["version"], model["health"], model["in_flight"]) == (
        "tiny", 1, "ok", 0
    )  # fmt: skip
    assert started - 1 <= model["loaded_at"] <= time.time()
    ttft = body["time_to_first_token"]
    assert ttft["requests"] == 3 and ttft["scope"] == "replica"
    assert 0 < ttft["p50_s"] <= ttft["p95_s"] < 5.0
    assert body["jobs"] == {"running": 0, "queued": 0}


def test_errors_make_the_error_rate_and_a_dead_engine_shows(config):
    _, key = make_key(config.database, "alpha", SCOPES)
    loader = FakeLoader()
    with running(config, catalog=FakeCatalog({"tiny": 1}, production=1), loader=loader) as gw:
        client = openai_client(gw, key)
        client.completions.create(model="tiny", prompt="The cat", max_tokens=4)
        loader.engines["tiny:1"].fail_next("the output broke")
        with pytest.raises(openai.InternalServerError):
            client.completions.create(model="tiny", prompt="The cat", max_tokens=4)
        with http(gw, authorization=f"Bearer {key}") as h:

            def counted():
                body = h.get("/v1/overview").json()
                return body if sum(m["requests"] for m in body["minutes"]) == 2 else None

            body = wait_for(counted, timeout=10)
            assert sum(m["errors"] for m in body["minutes"]) == 1
            assert body["error_rate"] == 0.5
            loader.engines["tiny:1"].kill("the runtime crashed")
            [model] = h.get("/v1/overview").json()["models"]
    assert (model["health"], model["detail"]) == ("dead", "the runtime crashed")


def test_a_key_sees_its_project_only(config):
    _, key_a = make_key(config.database, "alpha", SCOPES)
    _, key_b = make_key(config.database, "beta", SCOPES)
    beta = _project_id(config, "beta")
    with running(config) as gw:
        want_a = _complete(key_a, gw, 2)
        want_b = _complete(key_b, gw, 1)
        with http(gw, authorization=f"Bearer {key_a}") as a:
            assert _hour(_overview_when(a, want_a)) == want_a
            assert_openai_error(a.get("/v1/overview", params={"project_id": beta}), 404)
        with http(gw, authorization=f"Bearer {key_b}") as b:
            assert _overview_when(b, want_b, project_id=beta)["project_id"] == beta


def test_another_projects_model_is_left_out_of_models_and_ttft(config):
    _, key_a = make_key(config.database, "alpha", SCOPES)
    _, key_b = make_key(config.database, "beta", SCOPES)
    db = Database.open(config.database)
    with db.session() as s:
        identity.own_model(s, CLI, project_by_name(s, "beta").id, "secret")
    db.close()
    catalog = FakeCatalog({"tiny": 1, "secret": 1}, production=1)
    with running(config, catalog=catalog, loader=FakeLoader()) as gw:
        openai_client(gw, key_a).completions.create(model="tiny", prompt="a", max_tokens=2)
        for _ in range(2):
            openai_client(gw, key_b).completions.create(model="secret", prompt="b", max_tokens=2)
        with http(gw, authorization=f"Bearer {key_a}") as a:
            seen_a = a.get("/v1/overview").json()
        with http(gw, authorization=f"Bearer {key_b}") as b:
            seen_b = b.get("/v1/overview").json()
    assert [m["name"] for m in seen_a["models"]] == ["tiny"]
    assert seen_a["time_to_first_token"]["requests"] == 1
    assert [m["name"] for m in seen_b["models"]] == ["secret", "tiny"]
    assert seen_b["time_to_first_token"]["requests"] == 3


def test_people_see_their_projects_and_admins_the_platform(config, monkeypatch):
    monkeypatch.setattr(identity, "_HASHER", PasswordHasher(time_cost=1, memory_cost=64,
                                                            parallelism=1))  # fmt: skip
    _, key = make_key(config.database, "alpha", SCOPES)
    _, key_b = make_key(config.database, "beta", SCOPES)
    db = Database.open(config.database)
    with db.session() as s:
        for name, admin in (("root", True), ("viewer", False), ("loner", False)):
            identity.create_user(s, CLI, f"{name}@example.org", name, PASSWORD, is_admin=admin)
        identity.add_member(s, CLI, project_by_name(s, "alpha").id, "viewer@example.org",
                            "viewer")  # fmt: skip
    db.close()
    with running(config) as gw:
        want = _complete(key, gw, 2)
        want_b = _complete(key_b, gw, 1)
        root, viewer, loner = (_signed_in(gw, n) for n in ("root", "viewer", "loner"))
        assert _hour(_overview_when(viewer, want)) == want
        everything = (want[0] + want_b[0], want[1] + want_b[1])
        assert _hour(_overview_when(root, everything)) == everything
        beta = _project_id(config, "beta")
        assert _hour(_overview_when(root, want_b, project_id=beta)) == want_b
        assert_openai_error(viewer.get("/v1/overview", params={"project_id": beta}), 404)
        alone = loner.get("/v1/overview")
        assert alone.status_code == 200, alone.text
        assert _hour(alone.json()) == (0, 0) and alone.json()["jobs"] == {"running": 0, "queued": 0}
        alpha = _project_id(config, "alpha")
        assert_openai_error(loner.get("/v1/overview", params={"project_id": alpha}), 404)
        assert_openai_error(root.get("/v1/overview", params={"project_id": "proj_nope"}), 404)


def test_queued_and_running_jobs_are_counted_per_project(config, tmp_path):
    _, key_a = make_key(config.database, "alpha", SCOPES)
    _, key_b = make_key(config.database, "beta", SCOPES)
    corpus = tmp_path / "corpus.jsonl"
    lines = [json.dumps({"text": f"line {i}: the cat sat on the mat."}) for i in range(50)]
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with running(config) as gw:
        client = openai_client(gw, key_a)
        with corpus.open("rb") as f:
            file = client.files.create(file=f, purpose="fine-tune")
        for _ in range(3):
            client.fine_tuning.jobs.create(model="tiny", training_file=file.id)
        with gw.state.db.session() as s:
            assert jobs.claim(s, "test-worker", lease_s=60.0) is not None
        with http(gw, authorization=f"Bearer {key_a}") as a:
            assert a.get("/v1/overview").json()["jobs"] == {"running": 1, "queued": 2}
        with http(gw, authorization=f"Bearer {key_b}") as b:
            assert b.get("/v1/overview").json()["jobs"] == {"running": 0, "queued": 0}


def test_bad_input_and_missing_scopes_are_refused(config):
    _, inference = make_key(config.database, "alpha", ["inference"])
    with running(config) as gw:
        with http(gw, authorization=f"Bearer {inference}") as h:
            e = assert_openai_error(h.get("/v1/overview", params={"project_id": "p" * 33}), 400,
                                    param="project_id")  # fmt: skip
            assert "33 characters; at most 32" in e["message"]
            assert_openai_error(h.get("/v1/overview"), 403)
        with http(gw) as h:
            assert_openai_error(h.get("/v1/overview"), 401)


def _project_id(config, name: str) -> str:
    db = Database.open(config.database)
    try:
        with db.session() as s:
            return project_by_name(s, name).id
    finally:
        db.close()


def _signed_in(gw, name: str):
    client = http(gw)
    r = client.post("/v1/auth/login", json={"email": f"{name}@example.org", "password": PASSWORD})
    assert r.status_code == 200, r.text
    client.headers["X-CSRF-Token"] = r.json()["csrf_token"]
    return client
