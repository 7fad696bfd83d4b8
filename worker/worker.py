"""The job worker: claims fine-tuning jobs from the control-plane database and runs them.

    loop: claim ─► heartbeat thread (lease, cancel) ─► training.* ─► finish
                   (every second)

Each claimed job runs in a thread of its own (`concurrency` at most). A heartbeat thread renews
the job's lease every `heartbeat_s` and reads its cancel flag; the trainer asks `should_stop`
after every step, so a cancel stops a running job within about a second plus one step, after a
checkpoint. If the lease is lost (this worker was presumed dead and another took the job) the
job is dropped without touching its row. Any exception a job raises fails that job, with its
message; the worker goes on. SIGTERM/Ctrl-C stop claiming, stop running jobs at a checkpoint and
put them back in the queue, where a worker resumes them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

from aimass_common.corpus import DataError
from controlplane import jobs
from controlplane.db import Database
from controlplane.errors import ControlPlaneError
from controlplane.files import FileStore
from controlplane.models import File
from exporters.errors import ExportError
from registry.errors import RegistryError
from registry.registry import Registry
from trainer.errors import TrainerError
from worker.reporting import Reporter

log = logging.getLogger("aimass.worker")

# a job's own failure (bad data, a setting the trainer refuses, a failed export): its message
# is the job's error; anything else is reported with its type, as a bug would be
JOB_ERRORS = (TrainerError, DataError, ExportError, RegistryError, ControlPlaneError)


@dataclass(frozen=True)
class WorkerConfig:
    lease_s: float = 30.0  # a job's lease: a worker silent this long is presumed dead
    heartbeat_s: float = 1.0  # lease renewal and cancel check interval
    poll_s: float = 1.0  # how often an idle worker looks for a job
    concurrency: int = 1  # jobs run at once

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"--concurrency={self.concurrency} must be >= 1")
        if not 0 < self.heartbeat_s * 3 <= self.lease_s:
            raise ValueError(
                f"--lease-s={self.lease_s} must be at least 3 heartbeats of {self.heartbeat_s} s"
            )


class Worker:
    def __init__(
        self,
        db: Database,
        registry: Registry,
        files: FileStore,
        work_dir: Path,
        config: WorkerConfig | None = None,
        worker_id: str | None = None,
    ):
        self.db, self.registry, self.files, self.work_dir = db, registry, files, work_dir
        self.config = config or WorkerConfig()
        self.id = worker_id or f"{socket.gethostname()}-{os.getpid()}"
        self.shutdown = threading.Event()

    def run(self) -> None:
        """Claim and run jobs until `shutdown` is set; then wait for the running ones."""
        running: list[threading.Thread] = []
        while not self.shutdown.is_set():
            running = [t for t in running if t.is_alive()]
            claimed = self._claim() if len(running) < self.config.concurrency else None
            if claimed is None:
                self.shutdown.wait(self.config.poll_s)
                continue
            thread = threading.Thread(target=self.run_job, args=(claimed,), daemon=True)
            thread.start()
            running.append(thread)
        for thread in running:
            thread.join()

    def run_one(self) -> str | None:
        """Claim one job and run it here; its id, or None when the queue is empty."""
        claimed = self._claim()
        if claimed is not None:
            self.run_job(claimed)
        return claimed.job.id if claimed else None

    def _claim(self) -> jobs.Claimed | None:
        try:
            with self.db.session() as s:
                return jobs.claim(s, self.id, self.config.lease_s)
        except Exception:
            log.exception("claiming a job failed; retrying")
            return None

    def run_job(self, claimed: jobs.Claimed) -> None:
        job = claimed.job
        lease = _Lease(self, job.id)
        reporter = Reporter(self.db, job.id)
        lease.start()
        try:
            outcome = self._run(job, reporter, lease)
        except JOB_ERRORS as e:
            outcome = ("failed", {"code": type(e).__name__, "message": str(e), "param": None})
        except Exception as e:
            log.exception("job %s failed", job.id)
            message = f"{type(e).__name__}: {e}"
            outcome = ("failed", {"code": "internal_error", "message": message, "param": None})
        finally:
            lease.stop()
        reporter.flush()
        self._record(job.id, lease, *outcome)

    def _run(self, job: jobs.JobView, reporter: Reporter, lease: _Lease):
        # deferred: torch (the trainer and exporters), loaded by the first job, so an idle worker
        # (the one `aimass serve` starts by default) does not hold it
        from worker import training

        home = self.work_dir / job.id
        corpus = self._fetch(job.training_file, home / "files")
        run_dir = home / "run"
        base_model = training.prepare(job, corpus, run_dir, self.registry)
        reporter.message(f"training {job.model} in {run_dir}")
        trained = training.run_training(run_dir, reporter.on_step, lease.should_stop)
        reporter.flush()
        if lease.lost.is_set():
            return ("lost", None)
        if lease.cancel.is_set() or self.shutdown.is_set():
            status = "cancelled" if lease.cancel.is_set() else "released"
            return (status, f"stopped at step {trained.step}; its checkpoint is kept")
        eval_report = None
        if job.validation_file:
            validation = self._fetch(job.validation_file, home / "files")
            dataset = f"sha256:{self._sha256(job.validation_file)}"
            eval_report = training.evaluate(run_dir, validation, home / "validation", dataset)
            reporter.message(f"validation loss {eval_report['validation_loss']:.4f}")
        with self.db.session() as s:
            name = jobs.own_model_name(s, job.id, self.id, self._versions)
        lineage = {"job": job.id, "training_file_sha256": self._sha256(job.training_file),
                   "hyperparameters": job.hyperparameters, "base_model": base_model}  # fmt: skip
        if base_model is None:
            lineage.pop("base_model")  # a preset: the trainer's lineage says none
        pkg = training.package(run_dir, home / "package", lineage, eval_report, reporter.message)
        pushed = self.registry.push(pkg, name)
        shutil.rmtree(pkg)  # its blobs are in the registry now; the run keeps the checkpoints
        result = {"registry": {"name": name, "version": pushed.version}, "eval": eval_report,
                  "step": trained.step, "train_loss": trained.train_loss,
                  "best_val_loss": trained.best_val_loss}  # fmt: skip
        return ("succeeded", (f"{name}:{pushed.version}", trained.tokens_seen, result))

    def _versions(self, name: str) -> list:
        try:
            return self.registry.versions(name)
        except RegistryError:
            return []

    def _fetch(self, file_id: str, folder: Path) -> Path:
        with self.db.session() as s:
            row = s.get(File, file_id)
            size, suffix = row.bytes, Path(row.filename).suffix.lower()
        dest = folder / f"{file_id}{suffix}"
        if not (dest.is_file() and dest.stat().st_size == size):
            self.files.download(file_id, size, dest.with_suffix(".part"))
            dest.with_suffix(".part").replace(dest)
        return dest

    def _sha256(self, file_id: str) -> str:
        with self.db.session() as s:
            return s.get(File, file_id).sha256

    def _record(self, job_id: str, lease: _Lease, status: str, detail) -> None:
        if status == "lost":
            log.warning("job %s: lease lost to another worker; dropped", job_id)
            return
        try:
            with self.db.session() as s:
                if status == "released":
                    jobs.release(s, job_id, self.id, detail)
                elif status == "succeeded":
                    model, tokens, result = detail
                    jobs.finish(s, job_id, self.id, status, message=f"the job succeeded: {model}",
                                fine_tuned_model=model, trained_tokens=tokens, result=result)  # fmt: skip
                elif status == "cancelled":
                    jobs.finish(
                        s, job_id, self.id, status, message=f"the job was cancelled: {detail}"
                    )
                else:
                    jobs.finish(s, job_id, self.id, status, message=detail["message"], error=detail)
        except jobs.LeaseLost:
            log.warning("job %s: lease lost before its end was recorded", job_id)


class _Lease:
    """A job's heartbeat thread: renews the lease, notices a cancel or a lost lease."""

    def __init__(self, worker: Worker, job_id: str):
        self.worker, self.job_id = worker, job_id
        self.cancel, self.lost, self._done = threading.Event(), threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._done.set()
        self._thread.join()

    def should_stop(self) -> bool:
        return self.cancel.is_set() or self.lost.is_set() or self.worker.shutdown.is_set()

    def _beat(self) -> None:
        config = self.worker.config
        while not self._done.wait(config.heartbeat_s):
            try:
                with self.worker.db.session() as s:
                    if jobs.heartbeat(s, self.job_id, self.worker.id, config.lease_s):
                        self.cancel.set()
            except jobs.LeaseLost:
                self.lost.set()
                return
            except Exception:  # the database is away: keep trying while the lease lasts
                log.exception("heartbeat of job %s failed", self.job_id)


def stop_on_signals(worker: Worker) -> contextlib.AbstractContextManager:
    """SIGTERM and SIGINT set the worker's shutdown flag (main thread only)."""

    @contextlib.contextmanager
    def handlers():
        previous = {sig: signal.signal(sig, lambda *_: worker.shutdown.set())
                    for sig in (signal.SIGTERM, signal.SIGINT)}  # fmt: skip
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    return handlers()
