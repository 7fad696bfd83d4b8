"""Usage, quotas, audit and platform configuration through a real gateway (uvicorn on a free
port, a real SQLite file): completions show up in /v1/usage, a used-up quota is a 429 naming
the quota and its reset, a settings change applies without a restart, and every query parameter
is bounded."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime, timedelta

import openai
import pytest
from argon2 import PasswordHasher

from controlplane import identity
from controlplane.access import CLI
from controlplane.db import Database
from controlplane.identity import project_by_name
from controlplane.quotas import set_quotas
from controlplane.usage import UsageRecorder, usage_report
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


@pytest.fixture
def config(tmp_path, tiny_registry):
    return base_config(tmp_path, tiny_registry, usage_flush_s=0.1)


def _complete(client: openai.OpenAI, n: int = 1, **kw) -> list:
    return [
        client.completions.create(model="tiny", prompt="The cat", max_tokens=5, **kw)
        for _ in range(n)
    ]


def _project_id(config, name: str) -> str:
    db = Database.open(config.database)
    try:
        with db.session() as s:
            return project_by_name(s, name).id
    finally:
        db.close()


def _usage_totals(body: dict) -> tuple[int, int, int]:
    data = body["data"]
    return (sum(b["requests"] for b in data), sum(b["prompt_tokens"] for b in data),
            sum(b["completion_tokens"] for b in data))  # fmt: skip


def test_usage_shows_the_tokens_of_completions(config):
    record, key = make_key(config.database, "alpha", ["inference", "admin"])
    with running(config) as gw:
        done = _complete(openai_client(gw, key), 3)
        want = (3, sum(c.usage.prompt_tokens for c in done),
                sum(c.usage.completion_tokens for c in done))  # fmt: skip
        with http(gw, authorization=f"Bearer {key}") as h:

            def totals():
                r = h.get("/v1/usage", params={"group_by": "minute"})
                assert r.status_code == 200, r.text
                return _usage_totals(r.json()) == want and r.json()

            body = wait_for(totals, timeout=10)
    assert {(b["project_id"], b["key_id"], b["model"]) for b in body["data"]} == {
        (record.project_id, record.key_id, "tiny")
    }
    assert body["group_by"] == "minute"


def test_stopping_the_gateway_flushes_usage(tmp_path, tiny_registry):
    config = base_config(tmp_path, tiny_registry, usage_flush_s=3600)
    record, key = make_key(config.database, "alpha", ["inference"])
    with running(config) as gw:
        done = _complete(openai_client(gw, key), 2)
    db = Database.open(config.database)
    try:
        with db.session() as s:
            buckets = usage_report(s, CLI, start=datetime.now(UTC) - timedelta(hours=1),
                                   end=datetime.now(UTC) + timedelta(minutes=1))  # fmt: skip
    finally:
        db.close()
    assert sum(b.completion_tokens for b in buckets) == sum(c.usage.completion_tokens for c in done)
    assert sum(b.requests for b in buckets) == 2


def test_a_used_up_quota_is_429_naming_it_and_its_reset(config):
    _, key = make_key(config.database, "alpha", ["inference"])
    db = Database.open(config.database)
    with db.session() as s:
        set_quotas(s, CLI, project_by_name(s, "alpha").id, {"tokens_per_day": 5})
    db.close()
    with running(config) as gw:
        _complete(openai_client(gw, key))  # admitted: nothing used yet; uses more than 5
        with http(gw, authorization=f"Bearer {key}") as h:
            r = h.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2})
    error = assert_openai_error(r, 429, "quota_exceeded")
    assert error["type"] == "rate_limit_error"
    midnight = (datetime.now(UTC) + timedelta(days=1)).strftime("%Y-%m-%dT00:00:00Z")
    assert "tokens_per_day quota of 5" in error["message"] and midnight in error["message"]
    until_midnight = (datetime.fromisoformat(midnight) - datetime.now(UTC)).total_seconds()
    assert abs(int(r.headers["retry-after"]) - until_midnight) < 60


def test_config_changes_apply_without_a_restart(config):
    with running(config) as gw, http(gw) as h:  # open access: the operator, a platform admin
        _complete(openai_client(gw), 2)  # no limit yet
        r = h.patch("/v1/config", json={"requests_per_minute": 1})
        assert r.status_code == 200, r.text
        assert {s["key"]: s["value"] for s in r.json()["data"]}["requests_per_minute"] == 1
        _complete(openai_client(gw))
        with pytest.raises(openai.RateLimitError, match="1 requests per minute"):
            _complete(openai_client(gw))
        entries = h.get("/v1/audit", params={"action": "setting.set"}).json()["data"]
    assert [(e["target"], e["before"], e["after"], e["actor"]) for e in entries] == [
        ("requests_per_minute", {"value": None}, {"value": 1}, "local")
    ]


def test_config_is_read_by_any_key_and_changed_by_no_key(config):
    _, key = make_key(config.database, "alpha", ["inference"])
    with running(config) as gw, http(gw, authorization=f"Bearer {key}") as h:
        r = h.get("/v1/config")
        assert r.status_code == 200
        setting = {s["key"]: s for s in r.json()["data"]}["upload_max_bytes"]
        assert setting["value"] == setting["default"] and setting["min"] == 1024
        assert_openai_error(h.patch("/v1/config", json={"requests_per_minute": 5}), 403)


def test_bad_settings_are_400_naming_the_setting(config):
    with running(config) as gw, http(gw) as h:
        e = assert_openai_error(h.patch("/v1/config", json={"requests_per_minute": 0}), 400,
                                "invalid_value", "requests_per_minute")  # fmt: skip
        assert "1..1000000" in e["message"]
        assert_openai_error(h.patch("/v1/config", json={"nope": 1}), 400, param="nope")
        assert_openai_error(h.patch("/v1/config", json=[1]), 400)


def test_a_key_sees_its_project_only(config):
    _, key_a = make_key(config.database, "alpha", ["inference", "admin"])
    make_key(config.database, "beta", ["inference"])
    beta = _project_id(config, "beta")
    with running(config) as gw, http(gw, authorization=f"Bearer {key_a}") as h:
        assert_openai_error(h.get("/v1/usage", params={"project_id": beta}), 404)
        assert_openai_error(h.get("/v1/audit", params={"project_id": beta}), 404)
        assert_openai_error(h.get(f"/v1/projects/{beta}/quotas"), 404)


def test_an_inference_key_may_not_read_usage_or_audit(config):
    _, key = make_key(config.database, "alpha", ["inference"])
    with running(config) as gw, http(gw, authorization=f"Bearer {key}") as h:
        assert_openai_error(h.get("/v1/usage"), 403, "missing_scope")
        assert_openai_error(h.get("/v1/audit"), 403, "missing_scope")


@pytest.mark.parametrize(
    ("path", "params", "param"),
    [
        ("/v1/usage", {"group_by": "week"}, "group_by"),
        ("/v1/usage", {"start_time": "yesterday"}, "start_time"),
        ("/v1/usage", {"end_time": "1e30"}, "end_time"),
        ("/v1/usage", {"start_time": "0", "group_by": "minute"}, "start_time"),
        ("/v1/usage", {"model": "m" * 201}, "model"),
        ("/v1/usage", {"start_time": "2030-01-02", "end_time": "2030-01-01"}, "end_time"),
        ("/v1/usage", {"format": "xml"}, "format"),
        ("/v1/usage", {"format": "csv", "start_time": "0", "group_by": "minute"}, "start_time"),
        ("/v1/usage", {"format": "csv", "model": "m" * 201}, "model"),
        ("/v1/audit", {"limit": "0"}, "limit"),
        ("/v1/audit", {"limit": "5000"}, "limit"),
        ("/v1/audit", {"limit": "many"}, "limit"),
        ("/v1/audit", {"after": "0"}, "after"),
        ("/v1/audit", {"since": "soon"}, "since"),
        ("/v1/audit", {"action": "a" * 65}, "action"),
    ],
)
def test_query_parameters_are_bounded(config, path, params, param):
    with running(config) as gw, http(gw) as h:
        assert_openai_error(h.get(path, params=params), 400, param=param)


def _admin_and_owner(config) -> str:
    """A platform admin and the owner of project "alpha", both people with passwords; alpha's
    id. Cheap argon2 parameters: these tests are not about hashing."""
    db = Database.open(config.database)
    db.upgrade()
    with db.session() as s:
        identity.create_user(s, CLI, "root@example.org", "root", PASSWORD, is_admin=True)
        identity.create_user(s, CLI, "owner@example.org", "owner", PASSWORD)
        project = identity.create_project(s, CLI, "alpha").id
        identity.add_member(s, CLI, project, "owner@example.org", "owner")
    db.close()
    return project


def _signed_in(gw, name: str):
    client = http(gw)
    r = client.post("/v1/auth/login", json={"email": f"{name}@example.org", "password": PASSWORD})
    assert r.status_code == 200, r.text
    client.headers["X-CSRF-Token"] = r.json()["csrf_token"]
    return client


def test_project_quotas_are_set_by_platform_admins(config, monkeypatch):
    monkeypatch.setattr(identity, "_HASHER", PasswordHasher(time_cost=1, memory_cost=64,
                                                            parallelism=1))  # fmt: skip
    alpha = _admin_and_owner(config)
    path = f"/v1/projects/{alpha}/quotas"
    with running(config) as gw:
        root, owner = _signed_in(gw, "root"), _signed_in(gw, "owner")
        r = root.patch(path, json={"tokens_per_month": 1000})
        assert r.status_code == 200, r.text
        assert r.json() == {"object": "project.quotas", "project_id": alpha,
                            "tokens_per_day": None, "tokens_per_month": 1000}  # fmt: skip
        assert owner.get(path).json()["tokens_per_month"] == 1000
        assert_openai_error(owner.patch(path, json={"tokens_per_day": 10**9}), 403)
        assert_openai_error(root.patch(path, json={"tokens_per_day": 0}), 400,
                            param="tokens_per_day")  # fmt: skip
        assert_openai_error(root.patch(path, json={"per_year": 1}), 400)
        assert_openai_error(root.patch("/v1/projects/proj_nope/quotas", json={}), 404)
        entries = owner.get("/v1/audit", params={"action": "project.quotas"}).json()["data"]
    assert [(e["actor"].split(":")[0], e["after"]["tokens_per_month"]) for e in entries] == [
        ("user", 1000)
    ]


def test_a_request_the_engine_fails_is_metered_as_an_error(config):
    record, key = make_key(config.database, "alpha", ["inference", "admin"])
    loader = FakeLoader()
    with running(config, catalog=FakeCatalog({"tiny": 1}, production=1), loader=loader) as gw:
        client = openai_client(gw, key)
        _complete(client)
        loader.engines["tiny:1"].fail_next("the output broke")
        with pytest.raises(openai.InternalServerError):
            _complete(client)
        with http(gw, authorization=f"Bearer {key}") as h:

            def counted():
                data = h.get("/v1/usage").json()["data"]
                return data if sum(b["requests"] for b in data) == 2 else None

            data = wait_for(counted, timeout=10)
    assert [(b["key_id"], b["requests"], b["errors"]) for b in data] == [(record.key_id, 2, 1)]


# ── CSV ──


def _csv_rows(r) -> list[dict[str, str]]:
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/csv")
    assert r.headers["content-disposition"].startswith('attachment; filename="usage-')
    return list(csv.DictReader(io.StringIO(r.text)))


def test_usage_as_csv_holds_the_json_buckets(config):
    record, key = make_key(config.database, "alpha", ["inference", "admin"])
    with running(config) as gw:
        done = _complete(openai_client(gw, key), 2)
        with http(gw, authorization=f"Bearer {key}") as h:
            params = {"group_by": "hour"}

            def flushed():
                body = h.get("/v1/usage", params=params).json()
                return body if sum(b["requests"] for b in body["data"]) == 2 else None

            body = wait_for(flushed, timeout=10)
            params |= {"start_time": str(body["start_time"]), "end_time": str(body["end_time"])}
            r = h.get("/v1/usage", params=params | {"format": "csv"})
    assert r.text.splitlines()[0] == ('"start_time","end_time","project_id","key_id","model",'
                                      '"requests","prompt_tokens","completion_tokens","errors"')  # fmt: skip
    rows = _csv_rows(r)
    [bucket] = body["data"]
    [row] = rows
    hour = datetime.fromtimestamp(bucket["start_time"], UTC)
    assert row == {
        "start_time": hour.strftime("%Y-%m-%dT%H:00:00Z"),
        "end_time": (hour + timedelta(hours=1)).strftime("%Y-%m-%dT%H:00:00Z"),
        "project_id": record.project_id,
        "key_id": record.key_id,
        "model": "tiny",
        "requests": "2",
        "prompt_tokens": str(sum(c.usage.prompt_tokens for c in done)),
        "completion_tokens": str(sum(c.usage.completion_tokens for c in done)),
        "errors": "0",
    }


def test_usage_csv_neutralises_cells_a_spreadsheet_would_run(config):
    """Model names are anyone's choice: one that starts like a formula comes out as text."""
    record, key = make_key(config.database, "alpha", ["inference", "admin"])
    at = datetime(2030, 1, 1, 12, 30, tzinfo=UTC)
    names = ['=HYPERLINK("http://x","y")', "+1", "-2+3", "@SUM(A1)", "\tx", 'a,"b"\nc']
    db = Database.open(config.database)
    recorder = UsageRecorder(db, now=lambda: at)
    for name in names:
        recorder.record(record.project_id, record.key_id, name, 3, 4)
    recorder.flush()
    db.close()
    with running(config) as gw, http(gw, authorization=f"Bearer {key}") as h:
        r = h.get("/v1/usage", params={"start_time": "2030-01-01", "end_time": "2030-01-02",
                                       "format": "csv"})  # fmt: skip
    rows = _csv_rows(r)
    assert sorted(row["model"] for row in rows) == sorted(
        ['\'=HYPERLINK("http://x","y")', "'+1", "'-2+3", "'@SUM(A1)", "'\tx", 'a,"b"\nc']
    )
    assert {(row["start_time"], row["requests"], row["completion_tokens"]) for row in rows} == {
        ("2030-01-01T00:00:00Z", "1", "4")
    }
    # text cells are quoted, counts bare
    assert '"\'=HYPERLINK(""http://x"",""y"")",1,3,4,0' in r.text


def test_usage_csv_has_the_json_permissions(config):
    _, inference = make_key(config.database, "alpha", ["inference"])
    _, admin = make_key(config.database, "alpha", ["inference", "admin"])
    beta, _ = make_key(config.database, "beta", ["inference"])
    with running(config) as gw:
        with http(gw, authorization=f"Bearer {inference}") as h:
            assert_openai_error(h.get("/v1/usage", params={"format": "csv"}), 403, "missing_scope")
        with http(gw, authorization=f"Bearer {admin}") as h:
            r = h.get("/v1/usage", params={"format": "csv", "project_id": beta.project_id})
            assert_openai_error(r, 404)
            empty = h.get("/v1/usage", params={"format": "csv"})
    assert _csv_rows(empty) == [] and empty.text.count("\n") == 1  # the header row alone
