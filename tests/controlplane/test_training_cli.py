"""`aimass files|jobs` as the operator runs them against a real SQLite file and file store:
upload (validated, the bad line named), list, show, cancel, events, delete; --json; an error on
one line with exit 2."""

from __future__ import annotations

import json

import pytest

from controlplane import jobs
from controlplane.access import CLI
from tests.controlplane.conftest import aimass
from tests.controlplane.test_files import TEXT_JSONL


@pytest.fixture
def where(sqlite_db, tmp_path, monkeypatch):
    monkeypatch.setenv("AIMASS_HOME", str(tmp_path / "home"))
    return ["--database", str(sqlite_db.engine.url), "--registry", str(tmp_path / "registry")]


def test_upload_list_and_delete_a_file(capsys, sqlite_db, where, tmp_path):
    (tmp_path / "c.jsonl").write_bytes(TEXT_JSONL)
    code, out, _ = aimass(capsys, "files", "upload", str(tmp_path / "c.jsonl"), *where, "--json")
    assert code == 0
    (uploaded,) = json.loads(out)
    assert uploaded["status"] == "processed" and uploaded["filename"] == "c.jsonl"
    code, out, _ = aimass(capsys, "files", "list", *where[:2])
    assert code == 0 and out.startswith(uploaded["id"]) and "processed" in out
    code, out, _ = aimass(capsys, "files", "delete", uploaded["id"], *where)
    assert code == 0
    assert aimass(capsys, "files", "list", *where[:2], "--json")[1].strip() == "[]"


def test_a_bad_file_is_one_line_naming_the_line(capsys, where, tmp_path):
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "ok"}\n{"text": \n')
    code, out, err = aimass(capsys, "files", "upload", str(tmp_path / "bad.jsonl"), *where)
    assert (code, out) == (2, "")
    assert err.startswith("aimass: error: bad.jsonl:2: malformed JSON") and err.count("\n") == 1


def test_jobs_list_show_cancel_and_events(capsys, sqlite_db, where, tmp_path):
    (tmp_path / "c.jsonl").write_bytes(TEXT_JSONL)
    file_id = json.loads(aimass(capsys, "files", "upload", str(tmp_path / "c.jsonl"), *where,
                                "--json")[1])[0]["id"]  # fmt: skip
    with sqlite_db.session() as s:
        job = jobs.create(s, CLI, model="tiny", training_file=file_id)
    db = where[:2]
    code, out, _ = aimass(capsys, "jobs", "list", *db)
    assert code == 0 and out.startswith(f"{job.id}  queued  tiny -> -")
    code, out, _ = aimass(capsys, "jobs", "cancel", job.id, *db, "--json")
    assert code == 0 and json.loads(out)[0]["status"] == "cancelled"
    code, out, _ = aimass(capsys, "jobs", "events", job.id, *db, "--follow")
    assert code == 0 and "cancelled before it started" in out  # --follow ends with the job
    code, out, err = aimass(capsys, "jobs", "show", "ftjob-nope", *db)
    assert (code, err) == (2, "aimass: error: no fine-tuning job 'ftjob-nope'\n")
