"""The promotion pipeline: a candidate → every gate → production, or stopped at the first that fails.

    train ─► parity ─► push ─► eval ─► load_test ─► canary ─► promote
    (corpus)  export    NAME:V   perplexity  engine +   alias with  production,
              + parity           + prompts   locust vs  weight,     through the
              check              vs production   SLO    watched     registry's gates

Which steps run depends on the source: a corpus is trained first; a checkpoint starts at
`parity` (export with every target's parity check, never forced); a fine-tuning job's version
is already in the registry, so `parity` reads the registry's gate on its manifest and `push` is
not needed.

Every step's result is an entry of the `pipeline` report (status, one-line detail, when, how
long, and which run of the pipeline produced it), attached to the candidate version once it
exists and kept in the work folder as well; the eval, load_test and canary reports are attached
under their own kinds. Every alias move goes through the registry, so it is an event.

Resume: a run first finds the candidate version (the same NAME whose lineage names the same
checkpoint sha256 and the same targets, or the same fine-tuning job) and its `pipeline` report,
and reuses each step that passed, up to the first that did not. An eval measured against a
version no longer in production is measured again.

A failure after the canary moved takes the canary's traffic away again (registry rollback).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from aimass_common.files import atomic_write, sha256_file
from pipeline import canary as canary_watch
from pipeline import steps
from pipeline.eval import HeldOut, builtin_held_out
from registry.errors import NotFound
from registry.manifest import decode
from registry.registry import Registry
from trainer.checkpoint import resolve
from trainer.errors import TrainerError

# the gate a failed step names, when it is not the step's own name
GATE = {"eval": "perplexity"}


class Stopped(Exception):
    """A gate refused the candidate: `gate` names it, the message gives its figures."""

    def __init__(self, gate: str, message: str):
        super().__init__(message)
        self.gate = gate


class PipelineError(Exception):
    """The pipeline could not run a step: its environment failed (an engine, a store)."""


class BadSource(ValueError):
    """The candidate's source is unusable: no checkpoint there, no such job, a job that made
    no version of NAME."""


@dataclass(frozen=True)
class Source:
    """What the candidate is made from: a checkpoint, a corpus and preset, or a job."""

    checkpoint: Path | None = None
    corpus: Path | None = None
    preset: str | None = None
    train_settings: tuple[str, ...] = ()  # `aimass train --set KEY=VALUE`, as given
    job: str | None = None
    database: str | None = None  # the control plane holding the job


@dataclass(frozen=True)
class Options:
    name: str
    registry: str  # URI
    slo: Path
    work_root: Path  # each candidate gets a folder below it
    targets: tuple[str, ...] = ("onnx-fp32",)
    held_out: HeldOut | None = None  # None: the exporters' built-in paragraphs
    max_ppl_increase: float = 0.02  # relative, candidate over production
    engine_args: tuple[str, ...] = ()  # `aimass serve` engine options for the load test
    load_scenario: str = "short_chat"
    load_rate: float = 2.0  # requests/s offered
    load_duration_s: float = 30.0
    load_users: int | None = None
    canary_weight: float = 0.1
    gateway: str | None = None  # the deployment's gateway, whose /metrics the watch reads
    watch_s: float = 300.0
    canary_limits: canary_watch.Limits = field(default_factory=canary_watch.Limits)
    threads: int | None = None  # ONNX Runtime threads for export parity and eval


@dataclass
class Candidate:
    key: str  # what identifies it across runs: checkpoint sha256 + targets, or the job id
    work: Path
    checkpoint: Path | None = None
    checkpoint_sha256: str | None = None
    version: int | None = None


@dataclass
class Outcome:
    name: str
    version: int
    report: dict  # the pipeline report


class Run:
    """One run of the pipeline over one candidate; `run()` is the whole of it."""

    def __init__(self, source: Source, options: Options, say: Callable[[str], None] = print):
        self.source, self.o, self.say = source, options, say
        self.registry = Registry.open(options.registry)
        self.record: dict = {}
        self.canary_moved = False

    # ---- the steps, in order ----

    def run(self) -> Outcome:
        cand = self._candidate()
        self.record = self._prior(cand)
        self.record["runs"] = self.record.get("runs", 0) + 1
        self.record |= {"name": self.o.name, "passed": None, "stopped_at": None,
                        "detail": "", "resumed": []}  # fmt: skip
        production = self._production()
        if cand.version is not None and cand.version == production:
            self._finish(cand, True, None, f"{self.o.name}:{cand.version} is production already")
            return Outcome(self.o.name, cand.version, self.record)
        order = ["train"] if self.source.corpus else []
        order += ["parity", "push"] if self.source.job is None else ["parity"]
        order += ["eval", "load_test", "canary", "promote"]
        handlers = {
            "train": self._train,
            "parity": self._parity,
            "push": self._push,
            "eval": self._eval,
            "load_test": self._load_test,
            "canary": self._canary,
            "promote": self._promote,
        }
        resuming = True
        for name in order:
            prior = self._entry(name)
            if resuming and self._reusable(name, prior, production):
                self.record["resumed"].append(name)
                self.say(f"{name}: passed in run {prior['run']} (reused): {prior['detail']}")
                self._apply(name, prior, cand)
                continue
            if resuming:  # from here on every step runs again: earlier results are stale
                done = order[: order.index(name)]
                self.record["steps"] = [
                    e for e in self.record.get("steps", []) if e["step"] in done
                ]
                resuming = False
            self._step(name, handlers[name], cand, production)
        self._finish(cand, True, None, f"{self.o.name}:{cand.version} promoted to production")
        return Outcome(self.o.name, cand.version, self.record)

    def _train(self, cand: Candidate, production: int | None) -> dict:
        run_dir = cand.work / "run"
        shutil.rmtree(run_dir, ignore_errors=True)  # a run that stopped before it passed
        s = self.source
        return steps.train(s.corpus, s.preset, list(s.train_settings), run_dir)

    def _parity(self, cand: Candidate, production: int | None) -> dict:
        if self.source.job is not None:
            return steps.registered_parity(self.registry, self.o.name, cand.version)
        return steps.export(
            cand.checkpoint, list(self.o.targets), cand.work / "package", self.o.threads
        )

    def _push(self, cand: Candidate, production: int | None) -> dict:
        return steps.push(self.registry, cand.work / "package", self.o.name)

    def _eval(self, cand: Candidate, production: int | None) -> dict:
        report = steps.evaluate(
            self.registry, self.o.name, cand.version, production, self._held_out(),
            self.o.max_ppl_increase, cand.work / "cache", self.o.threads,
        )  # fmt: skip
        self.registry.attach_report(self.o.name, cand.version, "eval", report)
        return report

    def _load_test(self, cand: Candidate, production: int | None) -> dict:
        manifest = self.registry.manifest(self.o.name, cand.version)
        o = self.o
        w = steps.workload(f"{o.name}:{cand.version}", manifest.max_context, o.load_scenario,
                           o.load_rate, o.load_duration_s, o.load_users)  # fmt: skip
        report = steps.load_test(o.registry, o.name, cand.version, o.slo, w,
                                 list(o.engine_args), cand.work / "load_test")  # fmt: skip
        self.registry.attach_report(o.name, cand.version, "load_test", report)
        return report

    def _canary(self, cand: Candidate, production: int | None) -> dict:
        o = self.o
        moved = steps.move_canary(self.registry, o.name, cand.version, o.canary_weight)
        self.canary_moved = True
        self.say(f"canary: {moved['detail']}; watching")
        report = steps.watch_canary(
            o.gateway, o.name, cand.version, production, o.watch_s, o.canary_limits
        )
        report = report | {"move": moved["detail"]}
        self.registry.attach_report(o.name, cand.version, "canary", report)
        return report

    def _promote(self, cand: Candidate, production: int | None) -> dict:
        return steps.promote(self.registry, self.o.name, cand.version)

    # ---- running one step ----

    def _step(self, name: str, handler, cand: Candidate, production: int | None) -> None:
        started, t0 = datetime.now(UTC), time.monotonic()
        entry = {"step": name, "started_at": started.isoformat(timespec="seconds"),
                 "run": self.record["runs"]}  # fmt: skip
        try:
            report = handler(cand, production)
        except steps.StepError as e:
            entry |= {"status": "error", "detail": str(e)}
            self._put(entry, t0, cand)
            self._withdraw_canary(production)
            self._finish(cand, False, name, str(e))
            raise PipelineError(f"{name}: {e}") from None
        except KeyboardInterrupt:  # a canary left with a weight would keep taking traffic
            self._withdraw_canary(production)
            raise
        status = "skipped" if report.get("skipped") else "passed" if report["passed"] else "failed"
        entry |= {"status": status, "detail": report["detail"]}
        for key in ("version", "checkpoint", "production_version"):
            if key in report:
                entry[key] = report[key]
        self._apply(name, entry, cand)
        self._put(entry, t0, cand)
        self.say(f"{name}: {status}: {report['detail']}")
        if not report["passed"]:
            gate = GATE.get(name, name)
            if name == "promote" and report.get("gates"):
                gate = ", ".join(report["gates"])
            withdrawn = self._withdraw_canary(production)
            where = f" ({withdrawn})" if withdrawn else ""
            self._finish(cand, False, gate, report["detail"] + where)
            raise Stopped(
                gate, f"gate {gate}: {report['detail']}{where}; {self._untouched(production)}"
            )

    def _apply(self, name: str, entry: dict, cand: Candidate) -> None:
        """What a passed step tells the rest: where the checkpoint is, which version."""
        if name == "train":
            cand.checkpoint = Path(entry["checkpoint"])
            cand.checkpoint_sha256 = sha256_file(cand.checkpoint / "model.safetensors")
        elif name == "push":
            cand.version = entry["version"]

    def _put(self, entry: dict, t0: float, cand: Candidate) -> None:
        entry["seconds"] = round(time.monotonic() - t0, 2)
        self.record["steps"] = [
            s for s in self.record.get("steps", []) if s["step"] != entry["step"]
        ]
        self.record["steps"].append(entry)
        self._save(cand)

    def _finish(self, cand: Candidate, passed: bool, gate: str | None, detail: str) -> None:
        self.record |= {"passed": passed, "stopped_at": gate, "detail": detail,
                        "finished_at": datetime.now(UTC).isoformat(timespec="seconds")}  # fmt: skip
        self._save(cand)

    def _save(self, cand: Candidate) -> None:
        cand.work.mkdir(parents=True, exist_ok=True)
        atomic_write(cand.work / "pipeline.json", json.dumps(self.record, indent=2).encode())
        if cand.version is not None:
            self.registry.attach_report(self.o.name, cand.version, "pipeline", self.record)

    def _withdraw_canary(self, production: int | None) -> str:
        if not self.canary_moved:
            return ""
        self.canary_moved = False
        return steps.rollback_canary(self.registry, self.o.name, production)

    def _untouched(self, production: int | None) -> str:
        return f"production stays {self.o.name}:{production}" if production else "no production"

    # ---- resume ----

    def _entry(self, name: str) -> dict | None:
        return next((s for s in self.record.get("steps", []) if s["step"] == name), None)

    def _reusable(self, name: str, prior: dict | None, production: int | None) -> bool:
        if prior is None or prior["status"] != "passed":
            return False
        # an eval against another production version compares with the wrong baseline
        return name != "eval" or prior.get("production_version") == production

    def _prior(self, cand: Candidate) -> dict:
        """The pipeline report of an earlier run over this candidate: the registry's when the
        version exists, else the work folder's."""
        if cand.version is not None:
            found = self.registry.reports(self.o.name, cand.version).get("pipeline")
            if found is not None:
                return found
        local = cand.work / "pipeline.json"
        if local.is_file():
            return json.loads(local.read_text())
        return {}

    def _production(self) -> int | None:
        got = self.registry.alias(self.o.name, steps.PRODUCTION)
        return got[0].version if got else None

    def _held_out(self) -> HeldOut:
        return self.o.held_out or builtin_held_out()

    # ---- which candidate ----

    def _candidate(self) -> Candidate:
        s, root = self.source, self.o.work_root / self.o.name
        if s.job is not None:
            version = self._job_version()
            return Candidate(key=s.job, work=root / _safe(s.job), version=version)
        if s.corpus is not None:
            digest = hashlib.sha256(Path(s.corpus).read_bytes()).hexdigest()
            what = json.dumps([digest, s.preset, *s.train_settings, "|", *self.o.targets])
            key = hashlib.sha256(what.encode()).hexdigest()[:16]
            cand = Candidate(key=key, work=root / f"corpus-{key}")
            prior = json.loads((cand.work / "pipeline.json").read_text()) if (
                cand.work / "pipeline.json").is_file() else {}  # fmt: skip
            trained = next((e for e in prior.get("steps", []) if e["step"] == "train"), None)
            if trained and trained["status"] == "passed":
                self._apply("train", trained, cand)
                cand.version = self._find_version(cand.checkpoint_sha256)
            return cand
        try:
            checkpoint = resolve(s.checkpoint)
        except TrainerError as e:
            raise BadSource(f"--checkpoint {s.checkpoint}: {e}") from None
        digest = sha256_file(checkpoint / "model.safetensors")
        key = hashlib.sha256(json.dumps([digest, *self.o.targets]).encode()).hexdigest()[:16]
        return Candidate(key=key, work=root / f"checkpoint-{key}", checkpoint=checkpoint,
                         checkpoint_sha256=digest, version=self._find_version(digest))  # fmt: skip

    def _find_version(self, checkpoint_sha256: str) -> int | None:
        """The newest version of NAME exported from this checkpoint with these targets."""
        try:
            versions = self.registry.versions(self.o.name)
        except NotFound:
            return None
        for info in reversed(versions):
            m = decode(self.registry.manifest_bytes(self.o.name, info.version))  # as pushed
            targets = sorted(a.target for a in m.artifacts)
            if m.lineage.checkpoint_sha256 == checkpoint_sha256 and targets == sorted(
                self.o.targets
            ):
                return info.version
        return None

    def _job_version(self) -> int:
        # deferred: sqlalchemy (the control plane's ORM), needed only for --job
        from sqlalchemy.exc import SQLAlchemyError

        from controlplane.access import CLI
        from controlplane.db import Database, failure_line
        from controlplane.errors import ControlPlaneError
        from controlplane.jobs import retrieve

        db = Database.open(self.source.database)
        try:
            with db.session() as s:
                job = retrieve(s, CLI, self.source.job)
        except ControlPlaneError as e:
            raise BadSource(f"--job {self.source.job}: {e}") from None
        except SQLAlchemyError as e:
            raise PipelineError(f"--job {self.source.job}: {failure_line(e)}") from None
        finally:
            db.close()
        if job.status != "succeeded" or not job.fine_tuned_model:
            raise BadSource(
                f"--job {self.source.job} is {job.status}; only a succeeded job has a model"
            )
        name, _, version = job.fine_tuned_model.partition(":")
        if name != self.o.name or not version.isdigit():
            raise BadSource(
                f"--job {self.source.job} made {job.fine_tuned_model}, not a version of "
                f"--name {self.o.name}"
            )
        return int(version)


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)
