"""A tiny run with four checkpoints (candidates of different quality) and a registry whose
`production` is the first of them, exported; `promote(...)` runs `aimass pipeline promote`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from exporters.package import export
from registry.registry import Registry
from tests.conftest import run_cli, tiny_overrides
from trainer import train
from trainer.config import build_train_config


@pytest.fixture(scope="session")
def pipeline_run(tmp_path_factory, corpus_file) -> Path:
    """240 steps of a tiny model, a checkpoint every 60 (each better than the last). Its
    context is 512 so a load test's long outputs (256 tokens) keep one slot busy long enough
    for a one-slot engine to fall behind."""
    run_dir = tmp_path_factory.mktemp("pipeline-run") / "run"
    overrides = tiny_overrides(
        max_steps=240,
        eval_every=60,
        keep_checkpoints=4,
        **{"model.dim": 64, "model.ffn_dim": 128, "model.max_seq_len": 512},
    )
    train.prepare_run(build_train_config("tiny", None, overrides), corpus_file, run_dir)
    train.run(train.load_run_config(run_dir), run_dir)
    return run_dir


def checkpoint(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:07d}"


@pytest.fixture(scope="session")
def production_package(tmp_path_factory, pipeline_run) -> Path:
    out = tmp_path_factory.mktemp("pipeline-production") / "pkg"
    return export(checkpoint(pipeline_run, 60), ["onnx-fp32"], out, threads=1)


@pytest.fixture
def registry(tmp_path, production_package) -> Registry:
    """tiny:1 (step 60) in production; the canary alias on it too, as a promotion leaves it."""
    reg = Registry.open(str(tmp_path / "registry"))
    reg.push(production_package, "tiny")
    reg.set_alias("tiny", "production", 1)
    reg.set_alias("tiny", "canary", 1)
    return reg


@pytest.fixture
def slo(tmp_path) -> Path:
    """Lenient on time for a tiny model on a slow or busy CPU (p95 TTFT ~30 ms with 32 slots at
    40 req/s of 256-token outputs on an AVX-512 machine, 0.7-1.5 s on a slower AVX2 one, where
    the load generator could not even send 40; the tests load 20); strict on errors, which a
    one-slot engine with one queue place gives at 40 req/s on any machine."""
    path = tmp_path / "slo.json"
    path.write_text(
        json.dumps(
            {
                "max_p95_ttft_ms": 2000,
                "max_error_rate": 0.0,
                "min_requests": 10,
                "min_sent_fraction": 0.5,
            }
        )  # fmt: skip
    )
    return path


def promote(registry: Registry, slo: Path, work: Path, *args: str, timeout: float = 240):
    """`aimass pipeline promote --name tiny` over the registry, with a short, dense load test
    (3 s at 20 req/s of long outputs) and one ONNX Runtime thread."""
    return run_cli(
        "pipeline", "promote", "--name", "tiny", "--registry", registry.store.uri,
        "--slo", str(slo), "--work", str(work), "--threads", "1",
        "--load-scenario", "long_output", "--load-rate", "20", "--load-duration", "3",
        *args, timeout=timeout,
    )  # fmt: skip
