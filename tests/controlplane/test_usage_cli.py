"""`aimass usage|audit|config|quotas` as the operator runs them: parsed, run against a real
SQLite file, printed (or JSON), an error on one line with exit 2."""

from __future__ import annotations

import json

import pytest

from controlplane.usage import UsageRecorder
from tests.controlplane.conftest import aimass
from tests.controlplane.rows import add_project


@pytest.fixture
def url(sqlite_db):
    return str(sqlite_db.engine.url)


def test_usage_lists_a_projects_buckets(capsys, sqlite_db, url):
    project = add_project(sqlite_db, "alpha")
    recorder = UsageRecorder(sqlite_db)
    recorder.record(project, "k1", "tiny", 12, 30)
    recorder.record(project, "", "tiny", 1, 2, error=True)
    recorder.flush()
    code, out, _ = aimass(capsys, "usage", "--database", url, "--project", "alpha", "--json")
    assert code == 0
    rows = json.loads(out)
    assert sorted((r["key_id"], r["prompt_tokens"], r["errors"]) for r in rows) == [
        ("", 1, 1),
        ("k1", 12, 0),
    ]
    code, out, _ = aimass(capsys, "usage", "--database", url, "--group-by", "day")
    assert code == 0 and "2 buckets, 45 tokens" in out


def test_usage_refuses_a_bad_time_and_an_unknown_project(capsys, url):
    code, _, err = aimass(capsys, "usage", "--database", url, "--since", "yesterday")
    assert code == 2
    assert (
        err == "aimass: error: --since 'yesterday' is neither unix seconds nor an ISO 8601 time\n"
    )
    code, _, err = aimass(capsys, "usage", "--database", url, "--project", "nope")
    assert (code, err) == (2, "aimass: error: no project named 'nope'\n")


def test_config_set_then_get_and_audit_shows_the_change(capsys, url):
    assert aimass(capsys, "config", "set", "requests_per_minute", "60", "--database", url)[0] == 0
    assert aimass(capsys, "config", "set", "default_model", "tiny", "--database", url)[0] == 0
    code, out, _ = aimass(capsys, "config", "get", "--database", url, "--json")
    assert code == 0
    values = json.loads(out)
    assert values["requests_per_minute"] == 60 and values["default_model"] == "tiny"
    code, out, _ = aimass(capsys, "config", "get", "requests_per_minute", "--database", url)
    assert out == "requests_per_minute = 60\n"
    code, out, _ = aimass(capsys, "audit", "--database", url, "--json")
    entries = json.loads(out)
    assert [(e["action"], e["target"], e["after"]) for e in entries] == [
        ("setting.set", "default_model", {"value": "tiny"}),
        ("setting.set", "requests_per_minute", {"value": 60}),
    ]


def test_config_set_out_of_bounds_is_one_line(capsys, url):
    code, out, err = aimass(capsys, "config", "set", "requests_per_minute", "0", "--database", url)
    assert (code, out) == (2, "")
    assert err == "aimass: error: requests_per_minute = 0 is out of bounds: 1..1000000\n"
    code, _, err = aimass(capsys, "config", "set", "tokens_per_day", "lots", "--database", url)
    assert code == 2 and "is not JSON" in err


def test_quotas_set_and_get(capsys, sqlite_db, url):
    add_project(sqlite_db, "alpha")
    code, out, _ = aimass(capsys, "quotas", "set", "alpha", "--tokens-per-day", "1000",
                          "--database", url)  # fmt: skip
    assert code == 0
    assert out == "alpha tokens_per_day = 1000\nalpha tokens_per_month = default\n"
    aimass(capsys, "quotas", "set", "alpha", "--tokens-per-month", "5000", "--database", url)
    code, out, _ = aimass(capsys, "quotas", "get", "alpha", "--database", url, "--json")
    assert json.loads(out)["tokens_per_day"] == 1000 and json.loads(out)["tokens_per_month"] == 5000
    code, _, err = aimass(capsys, "quotas", "set", "alpha", "--tokens-per-day", "-1",
                          "--database", url)  # fmt: skip
    assert code == 2 and "tokens_per_day = -1 is out of bounds" in err
