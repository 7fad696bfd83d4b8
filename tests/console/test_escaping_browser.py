"""Data is shown as text, never run, in a real browser (Debian's Chromium): a file named with
markup on the Datasets and Training pages, and a job's log line holding a script and an image
with an error handler on the job's page. A script that ran would set window.pwned."""

from __future__ import annotations

import httpx
import pytest

from controlplane import identity, jobs
from controlplane.access import CLI
from controlplane.db import Database
from registry.registry import Registry
from tests.console.conftest import add_people, open_page
from tests.gateway.conftest import base_config, make_key, running

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="Playwright's Python package is not installed (make venv)"
)
expect = sync_api.expect

EVIL = '<script>window.pwned=1</script><img src=x onerror="window.pwned=2">'
NAME = '<img src=x onerror="window.pwned=3"><b>bold'  # a file name has no slash


@pytest.fixture
def gw(tmp_path, monkeypatch, cheap_hashing):
    monkeypatch.setenv("AIMASS_HOME", str(tmp_path / "home"))
    Registry.open(str(tmp_path / "registry"))
    config = base_config(tmp_path, tmp_path / "registry")
    add_people(config.database, ("root@example.org", "Root", True))
    db = Database.open(config.database)
    with db.session() as s:
        project = identity.create_project(s, CLI, "alpha").id
        identity.add_member(s, CLI, project, "root@example.org", "owner")
    db.close()
    with running(config) as gw:
        yield gw


def test_file_names_and_log_lines_are_text(gw, chromium):
    _, key = make_key(gw.config.database, "alpha", ["train"])
    auth = {"Authorization": f"Bearer {key}"}
    body = b'{"text": "hello there"}\n' * 50
    uploaded = httpx.post(f"{gw.url}/v1/files", headers=auth, data={"purpose": "fine-tune"},
                          files={"file": (f"{NAME}.jsonl", body)}).json()  # fmt: skip
    assert uploaded.get("filename") == f"{NAME}.jsonl", uploaded
    job = httpx.post(f"{gw.url}/v1/fine_tuning/jobs", headers=auth,
                     json={"model": "tiny", "training_file": uploaded["id"]}).json()  # fmt: skip
    with gw.state.db.session() as s:  # what a worker would write: a log line holding markup
        jobs.add_event(s, job["id"], f"reading {EVIL}", level="warning")

    page = open_page(chromium, url=gw.url, email="root@example.org")
    for path, where, text in (("/console/datasets", "file-row", NAME),
                              (f"/console/training/{job['id']}", "job-log", EVIL)):  # fmt: skip
        page.goto(gw.url + path)
        expect(page.get_by_test_id(where).first).to_contain_text(text)
        assert page.evaluate("window.pwned") is None
        assert page.locator("img[src=x]").count() == 0
    page.goto(f"{gw.url}/console/training")
    expect(page.get_by_test_id("job-training-file")).to_contain_text(NAME)
    assert page.evaluate("window.pwned") is None
    assert page.problems == []
    page.context.close()
