"""The job worker on a real SQLite database, registry folder and file store: a job trained from
scratch ends as a registry version with lineage, events, checkpoints and an owned name; cancel
stops a running job within seconds keeping its checkpoint; a job's failure fails that job only;
a worker killed mid-job is taken over and the job resumed from its checkpoint, exactly."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from controlplane import files, jobs
from controlplane.access import CLI
from controlplane.db import Database
from controlplane.models import ModelOwner
from registry.registry import Registry
from tests.conftest import DEMO_CORPUS
from worker.cli import register
from worker.worker import Worker, WorkerConfig

FAST = {"max_steps": 3, "batch_size": 4, "block_size": 32, "eval_interval": 3}


def corpus_jsonl(chars: int = 20_000) -> bytes:
    text = DEMO_CORPUS.read_text(encoding="utf-8")[:chars]
    lines = [json.dumps({"text": p}) for p in text.split("\n\n") if p.strip()]
    return ("\n".join(lines) + "\n").encode()


class Platform:
    """A database, a registry folder and a file store under one folder: what a worker uses."""

    def __init__(self, root: Path):
        self.root = root
        self.db = Database.open(f"sqlite:///{root / 'aimass.db'}")
        self.db.upgrade()
        self.registry = Registry.open(str(root / "registry"))
        self.store = files.FileStore.open(str(root / "registry"), home=root)

    def upload(self, data: bytes, filename: str = "corpus.jsonl") -> str:
        with self.db.session() as s:
            project_id, _ = files.begin_upload(s, CLI, None)
        spool = files.Spool(self.store.spool_dir, 1 << 30, files.spool_suffix(filename))
        spool.write(data)
        view = files.upload(self.db, self.store, CLI, project_id=project_id, purpose="fine-tune",
                            filename=filename, spooled=spool.close())  # fmt: skip
        return view.id

    def create(self, file_id: str, **kw) -> str:
        kw.setdefault("hyperparameters", FAST)
        with self.db.session() as s:
            kw.setdefault("model", "tiny")
            return jobs.create(s, CLI, training_file=file_id, seed=5, **kw).id

    def job(self, job_id: str) -> jobs.JobView:
        with self.db.session() as s:
            return jobs.retrieve(s, CLI, job_id)

    def events(self, job_id: str) -> list[jobs.EventView]:
        with self.db.session() as s:
            return jobs.list_events(s, CLI, job_id, limit=10_000, ascending=True)

    def worker(self, name: str = "w1", **config) -> Worker:
        config = WorkerConfig(**({"heartbeat_s": 0.2, "lease_s": 3.0} | config))
        return Worker(self.db, self.registry, self.store, self.root / "jobs", config, name)


@pytest.fixture
def platform(tmp_path):
    p = Platform(tmp_path)
    yield p
    p.db.close()


def test_a_job_ends_as_a_registry_version_of_its_own_name_and_can_be_tuned_again(platform):
    train = platform.upload(corpus_jsonl())
    valid = platform.upload(corpus_jsonl(4_000), "valid.jsonl")
    job_id = platform.create(train, validation_file=valid, suffix="docs-bot")
    assert platform.worker().run_one() == job_id
    job = platform.job(job_id)
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model == "docs-bot:1" and job.trained_tokens == 3 * 4 * 32
    manifest = platform.registry.manifest("docs-bot", 1)
    assert manifest.lineage.job == job_id and manifest.lineage.hyperparameters == FAST
    with platform.db.session() as s:
        assert manifest.lineage.training_file_sha256 == files.retrieve(s, CLI, train).sha256
        assert s.get(ModelOwner, "docs-bot").project_id == job.project_id
        (checkpoint,) = jobs.list_checkpoints(s, CLI, job_id)
    assert manifest.reports.parity["onnx-fp32"] and manifest.reports.eval["validation_loss"] > 0
    with platform.db.session() as s:  # named by content: the promotion gate compares like with like
        valid_sha = files.retrieve(s, CLI, valid).sha256
    assert manifest.reports.eval["dataset"] == f"sha256:{valid_sha}"
    assert manifest.reports.eval["perplexity"] == manifest.reports.eval["validation_perplexity"]
    assert platform.registry.aliases("docs-bot") == {}  # production never moves
    metrics = [e.data for e in platform.events(job_id) if e.type == "metrics"]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert {"train_loss", "lr", "tokens_per_s"} <= set(metrics[0]) and "valid_loss" in metrics[2]
    assert checkpoint.step == 3 and checkpoint.metrics["valid_loss"] == metrics[2]["valid_loss"]

    # the result is a registry model: a job fine-tunes it from the checkpoint its lineage names
    tuned = platform.create(train, model="docs-bot:1", suffix="docs-bot")
    assert platform.worker().run_one() == tuned
    assert platform.job(tuned).fine_tuned_model == "docs-bot:2", platform.job(tuned).error
    assert platform.registry.manifest("docs-bot", 2).lineage.base_model == "docs-bot:1"


def test_a_failing_job_fails_alone_with_its_message(platform):
    tiny_text = platform.upload(b'{"text": "too short"}\n')
    bad = platform.create(tiny_text)
    good = platform.create(platform.upload(corpus_jsonl()))
    worker = platform.worker()
    assert worker.run_one() == bad
    failed = platform.job(bad)
    assert failed.status == "failed" and "too little text" in failed.error["message"]
    assert worker.run_one() == good and platform.job(good).status == "succeeded"
    assert platform.job(good).fine_tuned_model == f"ft-{good.removeprefix('ftjob-')}:1"


def test_a_shared_registry_name_is_not_taken_over(platform):
    train = platform.upload(corpus_jsonl())
    platform.create(train, suffix="shared")
    platform.worker().run_one()
    with platform.db.session() as s:
        s.delete(s.get(ModelOwner, "shared"))  # now a model every project shares
    job_id = platform.create(train, suffix="shared")
    platform.worker().run_one()
    job = platform.job(job_id)
    assert job.status == "failed" and "shared registry model" in job.error["message"]
    assert [v.version for v in platform.registry.versions("shared")] == [1]


def test_cancel_stops_a_running_job_within_seconds_keeping_its_checkpoint(platform):
    hp = {"max_steps": 100_000, "batch_size": 4, "block_size": 32, "eval_interval": 5}
    job_id = platform.create(platform.upload(corpus_jsonl()), hyperparameters=hp)
    worker = platform.worker()
    thread = threading.Thread(target=worker.run_one)
    thread.start()
    deadline = time.monotonic() + 120
    while not any(e.type == "metrics" and e.data["step"] >= 5 for e in platform.events(job_id)):
        assert time.monotonic() < deadline and thread.is_alive()
        time.sleep(0.1)
    with platform.db.session() as s:
        jobs.cancel(s, CLI, job_id)
    asked = time.monotonic()
    thread.join(60)
    assert time.monotonic() - asked < 10
    job = platform.job(job_id)
    assert job.status == "cancelled" and job.fine_tuned_model is None
    with platform.db.session() as s:
        kept = jobs.list_checkpoints(s, CLI, job_id)[0]
    run = platform.root / "jobs" / job_id / "run"
    assert (run / "checkpoint").resolve().name == f"step-{kept.step:07d}"


@pytest.mark.slow
def test_a_killed_workers_job_is_taken_over_and_resumed_exactly(platform, tmp_path):
    hp = {"max_steps": 40, "batch_size": 4, "block_size": 32, "eval_interval": 10}
    train = platform.upload(corpus_jsonl())
    job_id = platform.create(train, hyperparameters=hp)
    env = os.environ | {"AIMASS_HOME": str(platform.root)}
    child = subprocess.Popen(
        [sys.executable, "-m", "aimass_cli", "worker", "--database", platform.db.url,
         "--registry", str(platform.root / "registry"), "--lease-s", "3"],  # fmt: skip
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while not any(e.data and e.data["step"] >= 12 for e in platform.events(job_id)):
            assert child.poll() is None, child.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline
            time.sleep(0.1)
        child.send_signal(signal.SIGKILL)  # no checkpoint on the way out, no release
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
    assert platform.job(job_id).status == "running"  # until its lease runs out
    time.sleep(3.5)
    assert platform.worker("w2").run_one() == job_id
    job = platform.job(job_id)
    assert job.status == "succeeded" and job.attempts == 2, job.error
    assert any("resumed by worker w2" in e.message for e in platform.events(job_id))
    # the same job run whole by one worker trains to the same loss: the resume was exact
    again = platform.create(train, hyperparameters=hp)
    platform.worker("w3").run_one()
    assert platform.job(again).result["train_loss"] == job.result["train_loss"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--concurrency", "0"], "aimass: error: --concurrency=0 must be >= 1\n"),
        (
            ["--lease-s", "2"],
            "aimass: error: --lease-s=2.0 must be at least 3 heartbeats of 1.0 s\n",
        ),
    ],
)
def test_worker_cli_bad_arguments_are_one_line_and_exit_2(capsys, tmp_path, argv, message):
    parser = argparse.ArgumentParser(prog="aimass")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["worker", "--database", f"sqlite:///{tmp_path / 'a.db'}", *argv])
    assert args.func(args) == 2
    assert capsys.readouterr().err == message
