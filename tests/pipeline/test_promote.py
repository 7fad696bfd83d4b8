"""`aimass pipeline promote` end to end, as a user runs it: real exports, a real engine under a
real load test, a real gateway whose metrics judge the canary; the tiny model throughout."""

from __future__ import annotations

import json
import threading
import time

import httpx

from controlplane import files, jobs
from controlplane.db import Database
from engine.core import EngineCore
from exporters.package import export
from registry.registry import Registry
from tests.conftest import tiny_overrides
from tests.controlplane.test_files import TEXT_JSONL, key_of, project, upload
from tests.gateway.conftest import base_config, deployment, http, running
from tests.pipeline.conftest import checkpoint, promote

STEPS = ["parity", "push", "eval", "load_test", "canary", "promote"]


def production(reg: Registry) -> int:
    return reg.alias("tiny", "production")[0].version


def alias_moves(reg: Registry) -> list[tuple[str, str, int]]:
    return [(e.action, e.alias, e.version) for e in reg.events("tiny") if e.alias]


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


def test_a_good_candidate_is_promoted_bad_ones_stop_at_their_gate_and_a_rerun_resumes(
    registry, slo, tmp_path, pipeline_run
):
    work = tmp_path / "work"

    # a good candidate: every gate passes, production moves, every report is attached
    good = promote(registry, slo, work, "--checkpoint", str(checkpoint(pipeline_run, 120)))
    assert good.returncode == 0, good.stderr
    assert good.stdout.strip().splitlines()[-1] == "tiny:2 is production"
    assert production(registry) == 2
    reports = registry.reports("tiny", 2)
    assert {"pipeline", "eval", "load_test", "canary"} <= set(reports)
    pipeline = reports["pipeline"]
    assert pipeline["passed"] is True and pipeline["stopped_at"] is None
    assert [s["step"] for s in pipeline["steps"]] == STEPS
    assert reports["canary"]["skipped"] is True
    assert reports["canary"]["detail"] == "no gateway to watch"
    ev = reports["eval"]
    assert ev["compared"] == "perplexity" and ev["production_version"] == 1
    assert ev["perplexity"] < ev["baseline"]["perplexity"]  # step 120 learned more than step 60
    assert {"tiny:1", "tiny:2"} <= set(ev["prompts"][0])  # both versions' answers side by side
    assert reports["load_test"]["passed"] is True and reports["load_test"]["p95_ms"] <= 2000
    manifest = registry.manifest("tiny", 2)  # the registry's view merges what was attached
    assert manifest.reports.eval["perplexity"] == ev["perplexity"]
    assert alias_moves(registry)[-2:] == [("alias", "canary", 2), ("promote", "production", 2)]

    # int4 costs a tiny model its parity: stopped at `parity`, nothing pushed
    lossy = promote(
        registry, slo, work, "--checkpoint", str(checkpoint(pipeline_run, 180)),
        "--targets", "onnx-int4",
    )  # fmt: skip
    assert lossy.returncode == 4, lossy.stderr
    line = one_line(lossy.stderr)
    assert "stopped at gate parity: onnx-int4" in line and "top-1 agreement" in line
    assert "production stays tiny:2" in line
    assert [v.version for v in registry.versions("tiny")] == [1, 2]
    assert production(registry) == 2

    # one engine slot and one queue place under 40 req/s of long outputs (the last --load-rate
    # wins): the requests it has no room for are refused (503), and the error rate stops it at
    # `load_test` (at 40 req/s even a request served in 10 ms leaves ~1 in 6 arrivals no room)
    moves = alias_moves(registry)
    slow = promote(
        registry, slo, work, "--checkpoint", str(checkpoint(pipeline_run, 180)),
        "--engine-args", "--slots 1 --max-waiting 1", "--load-rate", "40",
    )  # fmt: skip
    assert slow.returncode == 4, slow.stderr
    line = one_line(slow.stderr)
    assert "stopped at gate load_test:" in line
    assert "max_error_rate: " in line and "(must be <= 0)" in line  # maybe beside other limits
    assert production(registry) == 2
    assert alias_moves(registry) == moves  # neither production nor the canary moved
    stopped = registry.reports("tiny", 3)
    assert stopped["pipeline"]["stopped_at"] == "load_test"
    assert stopped["load_test"]["passed"] is False and stopped["load_test"]["error_rate"] > 0
    assert stopped["load_test"]["engine_args"] == ["--slots", "1", "--max-waiting", "1"]
    assert "canary" not in stopped

    # the same candidate on an ordinary engine: resumes at load_test, the earlier steps reused
    again = promote(registry, slo, work, "--checkpoint", str(checkpoint(pipeline_run, 180)))
    assert again.returncode == 0, again.stderr
    assert "parity: passed in run 1 (reused)" in again.stdout
    pipeline = registry.reports("tiny", 3)["pipeline"]
    assert pipeline["runs"] == 2 and pipeline["resumed"] == ["parity", "push", "eval"]
    ran_in = {s["step"]: s["run"] for s in pipeline["steps"]}
    assert ran_in == {"parity": 1, "push": 1, "eval": 1, "load_test": 2, "canary": 2, "promote": 2}
    assert [v.version for v in registry.versions("tiny")] == [1, 2, 3]  # not pushed again
    assert production(registry) == 3


def _traffic(url: str, stop: threading.Event, statuses: list[int]) -> None:
    """Requests for plain `tiny` (production's, or the canary's by its weight) until stopped."""
    body = {"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}
    with httpx.Client(base_url=url, timeout=30) as client:
        while not stop.is_set():
            statuses.append(client.post("/v1/chat/completions", json=body).status_code)
            time.sleep(0.05)


def _break_every_engine_but(monkeypatch, healthy) -> None:
    """Every engine in this process but `healthy` fails its first forward (EngineDead): a
    canary whose engine is broken on the deployment, though it passed its own load test."""
    execute = EngineCore.execute

    def failing(self, plan):
        if self is not healthy:
            raise RuntimeError("this engine fails every forward")
        return execute(self, plan)

    monkeypatch.setattr(EngineCore, "execute", failing)


def test_a_canary_whose_error_rate_rises_is_rolled_back(
    registry, slo, tmp_path, pipeline_run, monkeypatch
):
    stop, statuses = threading.Event(), []
    with running(base_config(tmp_path / "gateway", tmp_path / "registry")) as gw:
        with http(gw) as h:  # production's engine, loaded before the candidate exists
            body = {
                "model": "tiny",
                "max_tokens": 2,
                "messages": [{"role": "user", "content": "Hi"}],
            }
            assert h.post("/v1/chat/completions", json=body).status_code == 200
        _break_every_engine_but(monkeypatch, deployment(gw, "tiny:1").engine.core)
        sender = threading.Thread(target=_traffic, args=(gw.url, stop, statuses))
        sender.start()
        try:
            result = promote(
                registry, slo, tmp_path / "work", "--checkpoint",
                str(checkpoint(pipeline_run, 240)), "--gateway", gw.url, "--watch", "60",
                "--canary-weight", "0.5",
            )  # fmt: skip
        finally:
            stop.set()
            sender.join(30)
    assert result.returncode == 4, result.stderr
    line = one_line(result.stderr)
    assert "stopped at gate canary: canary error rate" in line
    assert "tiny@canary rolled back 2 -> 1" in line and "production stays tiny:1" in line
    assert production(registry) == 1
    assert registry.alias("tiny", "canary")[0].version == 1
    assert alias_moves(registry)[-2:] == [("alias", "canary", 2), ("rollback", "canary", 1)]
    reports = registry.reports("tiny", 2)
    assert reports["load_test"]["passed"] is True  # on its own engine, started by the pipeline
    assert reports["pipeline"]["stopped_at"] == "canary"
    canary = reports["canary"]
    assert canary["passed"] is False and canary["watched_s"] < 60  # stopped once clear
    assert canary["canary"]["errors"] >= 5 and canary["canary"]["error_rate"] > 0.5
    assert canary["production"]["requests"] > 0 and canary["production"]["errors"] == 0
    assert 200 in statuses  # production kept serving
    work = next((tmp_path / "work" / "tiny").iterdir())
    assert json.loads((work / "pipeline.json").read_text())["stopped_at"] == "canary"


def test_a_corpus_is_trained_and_a_worse_candidate_stops_at_perplexity_twice_trained_once(
    registry, slo, tmp_path, corpus_file
):
    """5 steps of training make a worse model than production's 60: stopped at `perplexity`;
    run again, the training is reused, not repeated."""
    settings = tiny_overrides(max_steps=5, eval_every=5, warmup_steps=1,
                              **{"model.dim": 64, "model.ffn_dim": 128})  # fmt: skip
    args = ["--corpus", str(corpus_file), "--preset", "tiny"]
    for key, value in settings.items():
        args += ["--set", f"{key}={value}"]
    for run in (1, 2):
        result = promote(registry, slo, tmp_path / "work", *args)
        assert result.returncode == 4, result.stderr
        line = one_line(result.stderr)
        assert "stopped at gate perplexity: " in line and "vs tiny:1" in line, line
        assert "production stays tiny:1" in line
        assert ("train: passed in run 1 (reused)" in result.stdout) == (run == 2)
    pipeline = registry.reports("tiny", 2)["pipeline"]
    assert pipeline["runs"] == 2 and pipeline["resumed"] == ["train", "parity", "push"]
    assert {s["step"]: s["run"] for s in pipeline["steps"]} == {
        "train": 1, "parity": 1, "push": 1, "eval": 2
    }  # fmt: skip
    assert registry.reports("tiny", 2)["eval"]["increase"] > 0.02
    assert [v.version for v in registry.versions("tiny")] == [1, 2]
    assert production(registry) == 1


def test_a_fine_tuning_jobs_version_is_promoted_without_a_push(
    registry, slo, tmp_path, pipeline_run
):
    """--job: the version the job pushed (here tiny:2, step 120) is the candidate; its parity is
    the registry's gate on its manifest, and nothing is exported or pushed again."""
    url = f"sqlite:///{tmp_path / 'aimass.db'}"
    db = Database.open(url)
    db.upgrade()
    store = files.FileStore.open(str(tmp_path / "files"), home=tmp_path / "home")
    key = key_of(project(db))
    training_file = upload(db, store, key, TEXT_JSONL).id
    with db.session() as s:
        job = jobs.create(s, key, model="tiny", training_file=training_file)
    with db.session() as s:
        jobs.claim(s, "w", 30)
        jobs.finish(s, job.id, "w", "succeeded", message="done", fine_tuned_model="tiny:2")
    db.close()
    registry.push(export(checkpoint(pipeline_run, 120), ["onnx-fp32"], tmp_path / "pkg"), "tiny")

    result = promote(registry, slo, tmp_path / "work", "--job", job.id, "--database", url)
    assert result.returncode == 0, result.stderr
    pipeline = registry.reports("tiny", 2)["pipeline"]
    assert [s["step"] for s in pipeline["steps"]] == [
        "parity", "eval", "load_test", "canary", "promote"
    ]  # fmt: skip
    assert pipeline["steps"][0]["detail"] == "passed for onnx-fp32"
    assert [v.version for v in registry.versions("tiny")] == [1, 2]
    assert production(registry) == 2
    assert (tmp_path / "work" / "tiny" / job.id / "pipeline.json").is_file()
