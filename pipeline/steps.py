"""The promotion pipeline's steps, one function each; each returns its report, a dict with
`passed` and a one-line `detail` (plus the step's own figures). A step that cannot run at all
(a missing file, an engine that does not start) raises StepError; a step that ran and found the
candidate wanting returns passed: False.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import msgspec

from engine.cli import add_engine_arguments
from exporters.errors import ExportError, ParityError
from exporters.package import export as export_package
from exporters.package import is_package
from exporters.parity import summary as parity_summary
from loadtests import runner, thresholds
from loadtests.workload import Workload
from pipeline import canary as canary_watch
from pipeline import eval as evaluation
from registry import gates
from registry.cache import pull
from registry.errors import GateFailed
from registry.manifest import load
from registry.registry import Registry

PRODUCTION = "production"
CANARY = "canary"
ENGINE_START_S = 120.0  # a gateway's start on a busy machine: imports, migrations, first load
REPORT_DROPS = ("timeseries", "definitions")  # load-test fields too big to keep in a manifest


class StepError(Exception):
    """A step could not run (its environment failed): not a verdict on the candidate."""


# ---- build ----


def train(corpus: Path, preset: str, settings: list[str], run_dir: Path) -> dict:
    """`aimass train` of `preset` on `corpus` into `run_dir` (KEY=VALUE `settings` as its
    --set), in its own process with its progress in run_dir's train.log: this command's stderr
    stays for its one-line verdict. The run's checkpoint is the candidate."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "aimass_cli", "train", "--corpus", str(corpus),
               "--preset", preset, "--out", str(run_dir)]  # fmt: skip
    for setting in settings:
        command += ["--set", setting]
    log = run_dir.parent / "train.log"
    with open(log, "wb") as err:
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=err, check=False)
    lines = log.read_text(errors="replace").strip().splitlines() or ["no output"]
    if done.returncode != 0:
        raise StepError(f"aimass train exited with code {done.returncode}: {lines[-1]}")
    return {
        "passed": True,
        "detail": lines[-1],  # its summary: why it stopped, at which step, the losses
        "checkpoint": done.stdout.decode().strip(),
        "log": str(log),
    }


def export(checkpoint: Path, targets: list[str], out: Path, threads: int | None) -> dict:
    """Exports the checkpoint with every target's parity check (never forced): a target that
    fails parity fails this step, the `parity` gate."""
    if is_package(out):  # exported by an earlier run of this pipeline, which stopped after
        return _exported(out, "exported by an earlier run")
    try:
        export_package(checkpoint, targets, out, threads=threads)
    except ParityError as e:  # its hint names export's --force, which the pipeline never uses
        return {"passed": False, "detail": str(e).split(" (--force")[0], "targets": targets}
    except ExportError as e:
        raise StepError(f"export of {checkpoint} failed: {e}") from None
    return _exported(out, "exported")


def _exported(out: Path, how: str) -> dict:
    reports = load(out).reports.parity
    return {
        "passed": True,
        "detail": f"{how}; parity passed for {', '.join(reports)}",
        "package": str(out),
        "parity": {t: parity_summary(r) for t, r in reports.items()},
    }


def push(registry: Registry, package: Path, name: str) -> dict:
    result = registry.push(package, name)
    return {
        "passed": True,
        "detail": f"pushed {name}:{result.version}",
        "version": result.version,
    }


def registered_parity(registry: Registry, name: str, version: int) -> dict:
    """For a version already in the registry (a fine-tuning job's): the registry's own parity
    gate on its manifest."""
    result = gates.check(registry.manifest(name, version), None, gates.GatePolicy(
        max_ppl_increase=None))[0]  # fmt: skip
    return {"passed": result.passed, "detail": result.detail}


# ---- measure ----


def evaluate(
    registry: Registry,
    name: str,
    version: int,
    production: int | None,
    held_out: evaluation.HeldOut,
    max_increase: float,
    cache: Path,
    threads: int | None,
) -> dict:
    """The eval report: perplexity on the held-out text and the prompt set, against the
    version in production (both pulled and verified into `cache`)."""
    candidate = pull(registry, f"{name}:{version}", cache_dir=cache)
    baseline = pull(registry, f"{name}:{production}", cache_dir=cache) if production else None
    labels = (f"{name}:{version}", f"{name}:{production}" if production else PRODUCTION)
    try:
        report = evaluation.evaluate(
            candidate, baseline, held_out, max_increase, labels=labels, threads=threads
        )
    except ValueError as e:
        raise StepError(str(e)) from None
    return report | {"production_version": production}


def check_engine_args(text: str) -> list[str]:
    """`--engine-args` as a list, after checking each against `aimass serve`'s engine options;
    ValueError naming the one refused."""
    args = shlex.split(text)
    parser = _EngineArgs(add_help=False)
    add_engine_arguments(parser)
    try:
        _, unknown = parser.parse_known_args(args)
    except ValueError as e:
        raise ValueError(f"--engine-args {text!r}: {e}") from None
    if unknown:
        raise ValueError(f"--engine-args {text!r}: {unknown[0]!r} is not an engine option")
    return args


class _EngineArgs(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would exit the process
        raise ValueError(message)


def workload(model: str, max_context: int, scenario: str, rate: float, duration_s: float,
             users: int | None) -> Workload:  # fmt: skip
    """The load test's traffic at `model`, its sizes cut to fit the model's context."""
    w = Workload(
        scenario=scenario,
        models=[model],
        rate=rate,
        duration_s=duration_s,
        users=users or max(4, round(rate * 4)),
        short_max_tokens=min(64, max(1, max_context // 4)),
        long_prompt_words=min(1000, max(1, max_context // 4)),
        long_output_tokens=min(512, max(1, max_context // 2)),
        request_timeout_s=60.0,
    )
    w.validate()
    return w


def load_test(
    registry_uri: str,
    name: str,
    version: int,
    slo_path: Path,
    w: Workload,
    engine_args: list[str],
    work: Path,
) -> dict:
    """Starts `aimass serve` on loopback over the registry with a private database and cache,
    serving NAME:VERSION with `engine_args`; load-tests it (loadtests.runner) against the SLO;
    stops it, always. The report is the runner's, less its time series."""
    slo = thresholds.load(slo_path)
    work.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    host = f"http://127.0.0.1:{port}"
    home = work / "engine-home"  # its own cache: the candidate is pulled and verified afresh
    command = [sys.executable, "-m", "aimass_cli", "serve", "--workers", "0", "--host",
               "127.0.0.1", "--port", str(port), "--registry", registry_uri,
               "--database", f"sqlite:///{work / 'engine.db'}", *engine_args]  # fmt: skip
    log = work / "engine.log"
    with open(log, "wb") as out:
        child = subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=os.environ | {"AIMASS_HOME": str(home)},
        )
    try:
        _wait_listening(child, host, log)
        result = runner.run(w, host, slo, work / "loadtest", warmup=1, wait_s=ENGINE_START_S)
    except runner.RunFailed as e:
        raise StepError(f"load test of {name}:{version} could not run: {e}") from None
    finally:
        _stop(child)
    report = {k: v for k, v in result.items() if k not in REPORT_DROPS}
    s = result["summary"]
    figures = (
        f"p95 TTFT {result['p95_ms']} ms, error rate {result['error_rate']}, "
        f"{result['rps']} req/s over {s['requests']} requests"
    )
    detail = figures if result["passed"] else f"{'; '.join(result['violations'])} ({figures})"
    return report | {"detail": detail, "engine_args": engine_args, "folder": str(work)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_listening(child: subprocess.Popen, host: str, log: Path) -> None:
    deadline = time.monotonic() + ENGINE_START_S
    while time.monotonic() < deadline:
        if child.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
            raise StepError(f"the engine exited with code {child.returncode}: {tail[0]}")
        try:
            with urllib.request.urlopen(f"{host}/healthz", timeout=2):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.25)
    raise StepError(f"the engine did not answer {host}/healthz within {ENGINE_START_S:g} s")


def _stop(child: subprocess.Popen, grace_s: float = 30.0) -> None:
    if child.poll() is None:
        child.send_signal(signal.SIGTERM)
        try:
            child.wait(grace_s)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


# ---- move ----


def move_canary(registry: Registry, name: str, version: int, weight: float) -> dict:
    move = registry.set_alias(name, CANARY, version, weight=weight)
    return {
        "passed": True,
        "detail": f"{name}@{CANARY} {move.from_version or 'none'} -> {version}, weight {weight:g}",
        "from_version": move.from_version,
        "weight": weight,
    }


def watch_canary(
    gateway: str | None,
    name: str,
    version: int,
    production: int | None,
    window_s: float,
    limits: canary_watch.Limits,
) -> dict:
    if gateway is None:
        return {"passed": True, "skipped": True, "detail": "no gateway to watch"}
    if production is None:
        return {"passed": True, "skipped": True,
                "detail": "no production version to compare with"}  # fmt: skip
    try:
        return canary_watch.watch(
            lambda: canary_watch.fetch_metrics(gateway), name, version, production, window_s,
            limits,
        )  # fmt: skip
    except canary_watch.WatchError as e:
        raise StepError(str(e)) from None


def rollback_canary(registry: Registry, name: str, production: int | None) -> str:
    """Takes the canary's traffic away: back to the canary's previous target (registry
    rollback), or, for a first canary, onto production's version without a weight."""
    got = registry.alias(name, CANARY)
    if got is None:
        return f"{name}@{CANARY} does not exist"
    record = got[0]
    if record.history:
        move = registry.rollback(name, CANARY)
    elif production is not None:
        move = registry.set_alias(name, CANARY, production)
    else:
        move = registry.set_alias(name, CANARY, record.version, weight=0.0)
        return f"{name}@{CANARY} weight set to 0 (no earlier target)"
    return f"{name}@{CANARY} rolled back {move.from_version} -> {move.version}"


def promote(registry: Registry, name: str, version: int) -> dict:
    """Moves production through the registry's gates, the load test required. Perplexity is
    the eval step's gate (both versions measured on the same text in this run), so the
    registry's comparison of stored figures is not asked for again."""
    policy = gates.policy_for(registry.gates_config(), PRODUCTION)
    policy = msgspec.structs.replace(policy, require_loadtest=True, max_ppl_increase=None)
    try:
        move = registry.promote(name, version, PRODUCTION, policy=policy)
    except GateFailed as e:
        return {"passed": False, "detail": str(e), "gates": [g.gate for g in e.failed]}
    return {
        "passed": True,
        "detail": f"{name}@{PRODUCTION} {move.from_version or 'none'} -> {version}",
        "from_version": move.from_version,
        "gates": [f"{g.gate}: {g.detail}" for g in move.gates],
    }
