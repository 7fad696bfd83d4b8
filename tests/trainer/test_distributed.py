"""torchrun with 2 CPU processes (gloo) must train like one process with the same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT, tiny_overrides


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_cmd(corpus, out, batch_size):
    overrides = tiny_overrides(batch_size=batch_size, max_steps=12, eval_every=6, device="cpu")
    return [
        "-m",
        "aimass_cli",
        "train",
        "--corpus",
        str(corpus),
        "--out",
        str(out),
        *[a for k, v in overrides.items() for a in ("--set", f"{k}={v}")],
    ]


def curve(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch built without torch.distributed"
)
def test_two_processes_match_one_process_with_the_same_global_batch(corpus_file, tmp_path):
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    single = tmp_path / "single"
    out = subprocess.run(
        [sys.executable, *train_cmd(corpus_file, single, 8)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr

    ddp = tmp_path / "ddp"
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
        "--master_addr=127.0.0.1",
    ]
    out = subprocess.run(
        [*launcher, *train_cmd(corpus_file, ddp, 4)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("step-0000012") == 1  # only rank 0 reports

    a, b = curve(single), curve(ddp)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    assert a[-1]["tokens_seen"] == b[-1]["tokens_seen"]
    for ra, rb in zip(a, b, strict=True):
        assert rb["train_loss"] == pytest.approx(ra["train_loss"], rel=1e-5, abs=1e-6)
        if "val_loss" in ra:
            assert rb["val_loss"] == pytest.approx(ra["val_loss"], rel=1e-5)
    wa = load_file(str(single / "checkpoint" / "model.safetensors"))
    wb = load_file(str(ddp / "checkpoint" / "model.safetensors"))
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-4, atol=1e-5)
