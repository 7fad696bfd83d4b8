"""Datasets, Training and a job's page in a real browser (Debian's Chromium) over a real gateway
and a training worker: an upload refused with the trainer's line-numbered message, then stored,
previewed and deleted; a job made with the form, followed live to its model (log, charts, the
link to the Model Library); cancel; a viewer sees the jobs without the controls."""

from __future__ import annotations

import json
import re
import threading

import pytest

from controlplane import identity
from controlplane.access import CLI
from controlplane.db import Database
from registry.registry import Registry
from tests.conftest import DEMO_CORPUS
from tests.console.conftest import add_people, open_page
from tests.gateway.conftest import base_config, make_key, openai_client, running
from worker.worker import Worker, WorkerConfig

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="Playwright's Python package is not installed (make venv)"
)
expect = sync_api.expect

BAD = b'{"text": "ok"}\n{"text": oops}\n'


def corpus(chars: int = 20_000) -> bytes:
    text = DEMO_CORPUS.read_text(encoding="utf-8")[:chars]
    return "".join(json.dumps({"text": p}) + "\n" for p in text.split("\n\n") if p.strip()).encode()


@pytest.fixture
def gw(tmp_path, monkeypatch, cheap_hashing):
    """A gateway with a platform admin (root, owner of project alpha) and a viewer of alpha
    (vera)."""
    monkeypatch.setenv("AIMASS_HOME", str(tmp_path / "home"))
    Registry.open(str(tmp_path / "registry"))
    config = base_config(tmp_path, tmp_path / "registry")
    add_people(
        config.database, ("root@example.org", "Root", True), ("vera@example.org", "Vera", False)
    )
    db = Database.open(config.database)
    db.upgrade()
    with db.session() as s:
        project = identity.create_project(s, CLI, "alpha").id
        identity.add_member(s, CLI, project, "root@example.org", "owner")
        identity.add_member(s, CLI, project, "vera@example.org", "viewer")
    db.close()
    with running(config) as gw:
        yield gw


@pytest.fixture
def worker(gw, tmp_path):
    """A training worker on the gateway's database, registry and file store."""
    registry = Registry.open(str(tmp_path / "registry"))
    config = WorkerConfig(heartbeat_s=0.2, lease_s=3.0, poll_s=0.1)
    w = Worker(gw.state.db, registry, gw.state.files, tmp_path / "home" / "jobs", config, "w1")
    thread = threading.Thread(target=w.run, daemon=True)
    thread.start()
    yield w
    w.shutdown.set()
    thread.join(60)


@pytest.fixture
def root(chromium, gw):
    page = open_page(chromium, url=gw.url, email="root@example.org")
    yield page
    page.context.close()


def _upload(page, gw, name: str, data: bytes) -> None:
    page.goto(f"{gw.url}/console/datasets")
    expect(page.get_by_test_id("project-switcher")).to_have_value(re.compile(r".+"))
    page.get_by_test_id("upload-input").set_input_files(
        files=[{"name": name, "mimeType": "application/jsonl", "buffer": data}]
    )
    page.get_by_test_id("upload-button").click()


def test_an_upload_is_checked_stored_previewed_and_deleted(gw, root):
    _upload(root, gw, "bad.jsonl", BAD)
    expect(root.get_by_test_id("upload-error")).to_contain_text("bad.jsonl:2: malformed JSON")
    assert root.get_by_test_id("upload-error").evaluate("e => e.tagName") == "PRE"
    expect(root.get_by_test_id("file-row")).to_have_count(0)

    data = corpus()
    _upload(root, gw, "docs.jsonl", data)
    expect(root.get_by_test_id("upload-status")).to_have_text("processed")
    assert root.get_by_test_id("upload-progress").evaluate("e => e.value") == 1  # all sent
    expect(root.get_by_test_id("upload-error")).to_be_empty()
    expect(root.get_by_test_id("file-row")).to_have_count(1)
    expect(root.get_by_test_id("file-row")).to_contain_text("docs.jsonl")

    root.get_by_test_id("preview-file").click()
    records = root.get_by_test_id("preview-record")
    expect(records).to_have_count(min(20, data.count(b"\n")))
    first = json.loads(data.split(b"\n", 1)[0])["text"]
    expect(records.first).to_contain_text(first[:40])

    root.once("dialog", lambda dialog: dialog.accept())
    root.get_by_test_id("delete-file").click()
    expect(root.get_by_test_id("file-row")).to_have_count(0)
    expect(root.locator("#preview-card")).to_be_hidden()
    assert root.problems == []


def test_a_job_from_the_form_to_its_model(gw, root, worker):
    _upload(root, gw, "docs.jsonl", corpus())
    expect(root.get_by_test_id("upload-status")).to_have_text("processed")

    root.goto(f"{gw.url}/console/training")
    model = root.get_by_test_id("job-model")
    expect(model.locator("option[value=tiny]")).to_have_count(1)
    model.select_option("tiny")
    expect(root.locator("#hp-learning_rate-hint")).to_contain_text("Default: 0.003")
    expect(root.get_by_test_id("hp-n_epochs")).to_have_attribute("placeholder", "auto")
    expect(root.get_by_test_id("hp-n_epochs")).to_have_attribute("max", "50")
    root.get_by_test_id("job-training-file").select_option(index=1)
    root.get_by_test_id("job-suffix").fill("webdocs")
    for name, value in {"max_steps": "3", "batch_size": "4", "block_size": "32",
                        "eval_interval": "3"}.items():  # fmt: skip
        root.get_by_test_id(f"hp-{name}").fill(value)
    root.get_by_test_id("create-job-button").click()
    root.wait_for_url("**/console/training/ftjob-*")  # the new job's page

    expect(root.get_by_test_id("job-status")).to_have_text("succeeded", timeout=120_000)
    expect(root.get_by_test_id("job-log")).to_contain_text("the job succeeded: webdocs:1")
    result = root.get_by_test_id("job-result-link")
    expect(result).to_have_attribute("href", "/console/models/webdocs")
    expect(result).to_have_text("webdocs:1")
    for chart in ("lr-chart", "tps-chart"):  # a point per step
        expect(root.get_by_test_id(chart).locator("svg")).to_have_attribute("data-points", "3")
    loss = root.get_by_test_id("loss-chart").locator("svg")
    expect(loss).to_have_attribute("data-points", "4")  # 3 training losses, 1 validation loss
    expect(root.get_by_test_id("cancel-job")).to_be_hidden()
    expect(root.get_by_test_id("job-hyperparameters")).to_contain_text("max_steps")

    # opened again from the list after the end: the same, from the history alone
    job_url = root.url
    root.goto(f"{gw.url}/console/training")
    expect(root.get_by_test_id("job-row")).to_have_count(1)
    root.get_by_role("link", name="webdocs:1").click()
    root.wait_for_url(job_url)
    expect(root.get_by_test_id("job-status")).to_have_text("succeeded")
    expect(loss).to_have_attribute("data-points", "4")
    expect(root.get_by_test_id("log-state")).to_have_text("The job succeeded.")
    assert root.problems == []


def test_cancel_and_what_a_viewer_sees(chromium, gw, root):
    _upload(root, gw, "docs.jsonl", corpus(2_000))
    expect(root.get_by_test_id("upload-status")).to_have_text("processed")
    root.goto(f"{gw.url}/console/training")
    root.get_by_test_id("job-training-file").select_option(index=1)
    root.get_by_test_id("hp-n_epochs").fill("0")  # below its bound: the API's message shows
    root.get_by_test_id("create-job-button").click()
    expect(root.get_by_test_id("job-error")).to_contain_text("n_epochs=0 must be >= 1")
    root.get_by_test_id("hp-n_epochs").fill("")
    root.get_by_test_id("create-job-button").click()
    root.wait_for_url("**/console/training/ftjob-*")
    expect(root.get_by_test_id("job-status")).to_have_text("queued")  # no worker runs here
    job_url = root.url

    vera = open_page(chromium, url=gw.url, email="vera@example.org", width=390)
    try:
        vera.goto(f"{gw.url}/console/training")
        expect(vera.get_by_test_id("job-row")).to_have_count(1)
        expect(vera.locator("#create-job-card")).to_be_hidden()
        expect(vera.locator("#create-readonly")).to_be_visible()
        vera.goto(job_url)
        expect(vera.get_by_test_id("job-status")).to_have_text("queued")
        expect(vera.get_by_test_id("cancel-job")).to_be_hidden()
        vera.goto(f"{gw.url}/console/datasets")
        expect(vera.get_by_test_id("file-row")).to_have_count(1)
        assert vera.get_by_test_id("delete-file").count() == 0
        expect(vera.locator("#upload-form")).to_be_hidden()
        # a phone's width: tables scroll inside their box, the page itself does not
        assert vera.evaluate("document.documentElement.scrollWidth") <= 390
        assert vera.problems == []
    finally:
        vera.context.close()

    root.get_by_test_id("cancel-job").click()
    expect(root.get_by_test_id("job-status")).to_have_text("cancelled")
    expect(root.get_by_test_id("cancel-job")).to_be_hidden()
    expect(root.get_by_test_id("job-log")).to_contain_text("cancelled before it started")
    expect(root.get_by_test_id("log-state")).to_have_text("The job was cancelled.")
    assert root.problems == []


def test_files_and_jobs_come_in_pages_of_20(gw, root):
    _, key = make_key(gw.config.database, "alpha", ["train"], role="developer")
    client = openai_client(gw, key)
    ids = [client.files.create(file=(f"f{i:02}.jsonl", b'{"text": "hi"}\n'), purpose="fine-tune").id
           for i in range(21)]  # fmt: skip
    for _ in range(21):  # no worker runs here: they stay queued
        client.fine_tuning.jobs.create(model="tiny", training_file=ids[0])
    for page, row in (("datasets", "file-row"), ("training", "job-row")):
        root.goto(f"{gw.url}/console/{page}")
        expect(root.get_by_test_id(row)).to_have_count(20)
        root.get_by_test_id("load-more").click()
        expect(root.get_by_test_id(row)).to_have_count(21)
    assert root.problems == []
