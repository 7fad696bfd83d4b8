"""Files and fine-tuning jobs through a real gateway with the official `openai` client: the
issue's acceptance (upload, job, succeeded, served at once) with a worker on the same database
and registry, bad uploads refused with the trainer's line-numbered message, the upload limit,
the live event stream, and permissions: a viewer's key 403 on jobs.create, another project's key
404 on the file. The acceptance exactly as written, against `aimass serve`, is the slow test."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from controlplane import jobs, settings
from controlplane.access import CLI
from controlplane.db import Database
from gateway.training import routes as training_routes
from registry.registry import Registry
from tests.conftest import DEMO_CORPUS
from tests.gateway.conftest import (
    assert_openai_error,
    base_config,
    free_port,
    http,
    make_key,
    openai_client,
    running,
    sse_data,
)
from trainer import config as trainer_config
from worker import training as worker_training
from worker.worker import Worker, WorkerConfig

FAST = {"max_steps": 3, "batch_size": 4, "block_size": 32, "eval_interval": 3}


def corpus(path: Path, chars: int = 20_000) -> Path:
    text = DEMO_CORPUS.read_text(encoding="utf-8")[:chars]
    lines = [json.dumps({"text": p}) for p in text.split("\n\n") if p.strip()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("AIMASS_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def platform(tmp_path, home):
    """A gateway in open access, and a worker thread on its database and registry."""
    registry = tmp_path / "registry"
    Registry.open(str(registry))
    config = base_config(tmp_path, registry)
    with running(config) as gw:
        db = gw.state.db
        worker = Worker(db, Registry.open(str(registry)), gw.state.files, home / "jobs",
                        WorkerConfig(heartbeat_s=0.2, lease_s=3.0, poll_s=0.1), "test-worker")  # fmt: skip
        thread = threading.Thread(target=worker.run, daemon=True)
        thread.start()
        try:
            yield gw
        finally:
            worker.shutdown.set()
            thread.join(60)


def wait_until_done(client: openai.OpenAI, job_id: str, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while (job := client.fine_tuning.jobs.retrieve(job_id)).status not in (
        "succeeded", "failed", "cancelled"
    ):  # fmt: skip
        assert time.monotonic() < deadline, f"job still {job.status} after {timeout} s"
        time.sleep(0.2)
    return job


def test_upload_train_and_serve_with_the_openai_client(platform, tmp_path):
    client = openai_client(platform)
    path = corpus(tmp_path / "corpus.jsonl")
    with open(path, "rb") as f:
        uploaded = client.files.create(file=f, purpose="fine-tune")
    assert uploaded.status == "processed" and uploaded.bytes == path.stat().st_size
    job = client.fine_tuning.jobs.create(model="tiny", training_file=uploaded.id, suffix="docs",
                                         hyperparameters=FAST)  # fmt: skip
    assert job.status == "queued"
    done = wait_until_done(client, job.id)
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model == "docs:1"
    reply = client.chat.completions.create(
        model=done.fine_tuned_model, messages=[{"role": "user", "content": "Hello"}], max_tokens=4
    )
    assert reply.model == "docs:1" and reply.usage.completion_tokens >= 1
    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    steps = [e.data["step"] for e in events if e.type == "metrics"]
    assert steps == [3, 2, 1]  # newest first, as OpenAI lists them
    (checkpoint,) = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert checkpoint.step_number == 3
    assert [j.id for j in client.fine_tuning.jobs.list().data] == [job.id]
    assert [f.id for f in client.files.list(purpose="fine-tune").data] == [uploaded.id]
    assert client.files.content(uploaded.id).read() == path.read_bytes()
    client.files.delete(uploaded.id)
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(uploaded.id)


def test_the_event_stream_follows_a_job_to_its_end(platform, tmp_path):
    client = openai_client(platform)
    data = corpus(tmp_path / "c.jsonl").read_bytes()
    uploaded = client.files.create(file=("c.jsonl", data), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model="tiny", training_file=uploaded.id,
                                         hyperparameters=FAST)  # fmt: skip
    with http(platform) as h, h.stream("GET", f"/v1/fine_tuning/jobs/{job.id}/events",
                                       params={"stream": "true"}, timeout=120) as r:  # fmt: skip
        assert r.headers["content-type"].startswith("text/event-stream")
        payloads = sse_data(r)
    assert payloads[-1] == "[DONE]"
    events = [json.loads(p) for p in payloads[:-1]]
    assert [e["data"]["step"] for e in events if e["type"] == "metrics"] == [1, 2, 3]
    assert "the job succeeded" in events[-1]["message"]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x89PNG\r\n\x1a\n\0\0\0", "bad.jsonl: binary file: this looks like a PNG image"),
        (
            b'{"text": "ok"}\n{"text": "\xff"}\n',
            "bad.jsonl:2: not valid UTF-8: byte 0xff at column 11",
        ),
        (b'{"text": "ok"}\n\n{"text": oops}\n', "bad.jsonl:3: malformed JSON: Expecting value"),
    ],
)
def test_a_bad_upload_is_refused_with_the_trainers_line_numbered_message(
    tmp_path, home, data, message
):
    registry = tmp_path / "registry"
    with running(base_config(tmp_path, registry)) as gw:
        client = openai_client(gw)
        with pytest.raises(openai.BadRequestError) as err:
            client.files.create(file=("bad.jsonl", data), purpose="fine-tune")
        assert err.value.body["message"].startswith(message)
        assert err.value.body["param"] == "file"
        assert client.files.list().data == []
    assert list((home / "files").glob("file-*")) == []  # nothing stored
    assert list((home / "files" / ".uploads").iterdir()) == []  # and no spool file left


def test_an_upload_over_the_limit_is_413_naming_it(tmp_path, home):
    config = base_config(tmp_path, tmp_path / "registry")
    with running(config) as gw:
        with gw.state.db.session() as s:
            settings.set_value(s, CLI, "upload_max_bytes", 2048)
        gw.state.settings.refresh()
        with http(gw) as h:
            r = h.post("/v1/files", data={"purpose": "fine-tune"},
                       files={"file": ("big.jsonl", b'{"text": "x"}\n' * 400)})  # fmt: skip
        error = assert_openai_error(r, 413)
        assert "upload limit of 2048 bytes" in error["message"]
        with http(gw) as h:  # a form without a file part
            r = h.post("/v1/files", data={"purpose": "fine-tune"})
        assert_openai_error(r, 400, param="file")


def test_a_viewer_key_may_not_create_jobs_and_another_project_sees_no_file(tmp_path, home):
    config = base_config(tmp_path, tmp_path / "registry")
    _, developer = make_key(config.database, "acme", ["train"], role="developer")
    _, viewer = make_key(config.database, "acme", ["train"], role="viewer")
    _, outsider = make_key(config.database, "other", ["train"])
    with running(config) as gw:
        path = corpus(tmp_path / "c.jsonl", 2_000)
        with open(path, "rb") as f:
            uploaded = openai_client(gw, developer).files.create(file=f, purpose="fine-tune")
        with pytest.raises(openai.PermissionDeniedError):
            openai_client(gw, viewer).fine_tuning.jobs.create(model="tiny",
                                                              training_file=uploaded.id)  # fmt: skip
        assert openai_client(gw, viewer).files.retrieve(uploaded.id).id == uploaded.id
        with pytest.raises(openai.NotFoundError):
            openai_client(gw, outsider).files.retrieve(uploaded.id)
        with pytest.raises(openai.NotFoundError):
            openai_client(gw, outsider).fine_tuning.jobs.create(model="tiny",
                                                                training_file=uploaded.id)  # fmt: skip
        queued = openai_client(gw, developer).fine_tuning.jobs.create(
            model="tiny", training_file=uploaded.id
        )
        with pytest.raises(openai.PermissionDeniedError):
            openai_client(gw, viewer).fine_tuning.jobs.cancel(queued.id)
        cancelled = openai_client(gw, developer).fine_tuning.jobs.cancel(queued.id)
        assert cancelled.status == "cancelled"  # no worker runs here: it was still queued
        with pytest.raises(openai.BadRequestError, match=r"n_epochs=0 must be >= 1"):
            openai_client(gw, developer).fine_tuning.jobs.create(
                model="tiny", training_file=uploaded.id, hyperparameters={"n_epochs": 0}
            )


# our hyperparameter → the TrainConfig field the worker sets from it (worker/training.py)
TRAIN_CONFIG_FIELD = {"batch_size": "batch_size", "block_size": "block_size",
                      "warmup_steps": "warmup_steps", "eval_interval": "eval_every",
                      "learning_rate": "lr"}  # fmt: skip


def test_the_job_options_are_the_services_bounds_and_the_trainers_defaults(tmp_path, home):
    config = base_config(tmp_path, tmp_path / "registry")
    _, viewer = make_key(config.database, "acme", ["train"], role="viewer")
    _, inference = make_key(config.database, "acme", ["inference"])
    with running(config) as gw:
        with http(gw, Authorization=f"Bearer {viewer}") as h:
            r = h.get("/v1/fine_tuning/options")
        with http(gw, Authorization=f"Bearer {inference}") as h:
            assert_openai_error(h.get("/v1/fine_tuning/options"), 403, "missing_scope")
    assert r.status_code == 200, r.text
    options = r.json()
    assert options["presets"] == ["tiny", "small"] == list(jobs.PRESETS)
    assert options["seed_maximum"] == jobs.MAX_SEED
    by_name = {hp["name"]: hp for hp in options["hyperparameters"]}
    assert list(by_name) == list(jobs.BOUNDS)
    scratch = trainer_config.build_train_config("tiny")
    tuned = trainer_config.build_train_config(
        None, None, None, base="base", base_model=trainer_config.PRESETS["small"]
    )
    for name, (kind, bounds) in jobs.BOUNDS.items():
        hp = by_name[name]
        assert hp["type"] == ("integer" if kind is int else "number")
        assert (hp["minimum"], hp["exclusive_minimum"], hp["maximum"]) == (
            bounds.get("ge"), bounds.get("gt"), bounds["le"]
        )  # fmt: skip
        assert hp["auto"] == (name in jobs.AUTO) and hp["description"]
        field = TRAIN_CONFIG_FIELD.get(name)
        if field is not None:
            assert hp["default"] == getattr(scratch, field), name
            assert hp["fine_tune_default"] == getattr(tuned, field), name
        for default in (hp["default"], hp["fine_tune_default"]):
            if default is not None:  # a default the service itself would accept
                assert jobs.check_hyperparameters({name: default}) == {name: default}
    assert by_name["n_epochs"]["default"] == worker_training.DEFAULT_EPOCHS
    assert by_name["n_epochs"]["fine_tune_default"] == worker_training.DEFAULT_EPOCHS
    assert by_name["max_steps"]["default"] is None  # n_epochs passes, counted at the start
    assert by_name["learning_rate_multiplier"]["default"] == 1.0  # the learning rate as is


def test_a_range_of_a_files_content_reads_only_those_bytes(tmp_path, home):
    config = base_config(tmp_path, tmp_path / "registry")
    _, developer = make_key(config.database, "acme", ["train"], role="developer")
    _, outsider = make_key(config.database, "other", ["train"])
    data = corpus(tmp_path / "c.jsonl", 5_000).read_bytes()
    size = len(data)
    with running(config) as gw:
        uploaded = openai_client(gw, developer).files.create(file=("c.jsonl", data),
                                                             purpose="fine-tune")  # fmt: skip
        store = gw.state.files.store
        reads = []
        read_chunks = store.read_chunks

        def spy(key, offset, stop):
            reads.append((offset, stop))
            return read_chunks(key, offset, stop)

        store.read_chunks = spy
        content = f"/v1/files/{uploaded.id}/content"
        with http(gw, Authorization=f"Bearer {developer}") as h:
            whole = h.get(content)
            assert whole.status_code == 200 and whole.content == data
            assert whole.headers["accept-ranges"] == "bytes"
            for header, start, stop in [("bytes=0-99", 0, 100), ("bytes=100-", 100, size),
                                        ("bytes=-50", size - 50, size),
                                        ("bytes=0-99999999", 0, size)]:  # fmt: skip
                reads.clear()
                r = h.get(content, headers={"Range": header})
                assert r.status_code == 206, (header, r.text)
                assert r.content == data[start:stop], header
                assert r.headers["content-range"] == f"bytes {start}-{stop - 1}/{size}"
                assert reads == [(start, stop)], header  # the store read no more than that
            for header in (f"bytes={size}-", "bytes=5-3", "bytes=-0", "bytes=0-1,5-6",
                           "items=0-5", "bytes=²-5".encode("latin-1")):  # fmt: skip
                r = h.get(content, headers={"Range": header})
                error = assert_openai_error(r, 416)
                assert f"{size} bytes" in error["message"], header
                assert r.headers["content-range"] == f"bytes */{size}"
        with http(gw, Authorization=f"Bearer {outsider}") as h:
            assert_openai_error(h.get(content, headers={"Range": "bytes=0-9"}), 404)


def test_the_event_stream_resumes_after_an_event_id(tmp_path, home, monkeypatch):
    monkeypatch.setattr(training_routes, "STREAM_BATCH", 2)  # a finished job's events, in batches
    with running(base_config(tmp_path, tmp_path / "registry")) as gw:
        client = openai_client(gw)
        data = corpus(tmp_path / "c.jsonl", 2_000).read_bytes()
        uploaded = client.files.create(file=("c.jsonl", data), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(model="tiny", training_file=uploaded.id)
        with gw.state.db.session() as s:
            for step in (1, 2, 3, 4):
                jobs.add_event(s, job.id, f"line {step}")
        client.fine_tuning.jobs.cancel(job.id)  # its last event; the job has ended
        stream = f"/v1/fine_tuning/jobs/{job.id}/events/stream"

        def read(**kw) -> tuple[list[str], list[str]]:
            with http(gw) as h, h.stream("GET", stream, **kw) as r:
                assert r.status_code == 200, r.read()
                lines = list(r.iter_lines())
            ids = [line.removeprefix("id: ") for line in lines if line.startswith("id: ")]
            data = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
            return ids, data

        ids, data = read()
        assert data[-1] == "[DONE]" and len(ids) == len(data) - 1 == 5  # all of them, then done
        assert ids == [json.loads(d)["id"] for d in data[:-1]]
        assert [json.loads(d)["message"] for d in data[1:3]] == ["line 2", "line 3"]
        later = ["line 3", "line 4", "the job was cancelled before it started"]
        for kw in ({"params": {"after": ids[1]}}, {"headers": {"Last-Event-ID": ids[1]}}):
            resumed_ids, resumed = read(**kw)
            assert resumed_ids == ids[2:], kw
            assert [json.loads(d)["message"] for d in resumed[:-1]] == later, kw
        with http(gw) as h:
            for bad in ("event-1", "ftevent-²", "ftevent-" + "9" * 5000):  # not ASCII, too long
                r = h.get(stream, params={"after": bad})
                assert_openai_error(r, 400, param="after")


@pytest.mark.slow
def test_the_acceptance_as_written_against_aimass_serve(tmp_path):
    """`aimass serve` (embedded default: SQLite, one worker child), then the issue's calls."""
    home = tmp_path / "home"
    port = free_port()
    env = os.environ | {"AIMASS_HOME": str(home)}
    env.pop("AIMASS_DATABASE", None)
    env.pop("AIMASS_REGISTRY", None)
    log = tmp_path / "serve.log"  # a file, not a pipe: a full pipe would stall the server
    server = subprocess.Popen([sys.executable, "-m", "aimass_cli", "serve", "--port", str(port)],
                              env=env, stdout=subprocess.DEVNULL, stderr=open(log, "wb"))  # noqa: SIM115  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", timeout=30, max_retries=0)
        path = corpus(tmp_path / "corpus.jsonl", 60_000)
        with open(path, "rb") as f:
            file = client.files.create(file=f, purpose="fine-tune")
        job = client.fine_tuning.jobs.create(model="tiny", training_file=file.id, suffix="acme",
                                             hyperparameters={"n_epochs": 1})  # fmt: skip
        done = wait_until_done(client, job.id, timeout=600)
        assert done.status == "succeeded", done.error
        assert done.fine_tuned_model == "acme:1"
        reply = client.chat.completions.create(
            model=done.fine_tuned_model, messages=[{"role": "user", "content": "Hi"}], max_tokens=8
        )
        assert reply.choices[0].message.content is not None
    finally:
        server.terminate()
        server.wait(60)
    db = Database.open(f"sqlite:///{home / 'aimass.db'}")
    try:
        with db.session() as s:
            from controlplane.models import Job  # noqa: PLC0415 - only this test reads the row

            assert s.get(Job, job.id).worker_id  # run by the serve's worker child
    finally:
        db.close()
