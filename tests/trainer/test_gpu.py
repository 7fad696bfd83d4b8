"""The CUDA path: bf16 autocast, fused AdamW, checkpoint and exact resume on a GPU."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from tests.conftest import tiny_overrides
from trainer import train
from trainer.checkpoint import load_model
from trainer.config import build_train_config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]


def test_trains_and_resumes_on_cuda(corpus_file, tmp_path):
    run_dir = tmp_path / "run"
    cfg = build_train_config("tiny", None, tiny_overrides(device="cuda", max_steps=20))
    train.prepare_run(cfg, corpus_file, run_dir)
    cfg = train.load_run_config(run_dir)
    first = train.run(dataclasses.replace(cfg, max_steps=10), run_dir)
    assert first.step == 10
    second = train.run(dataclasses.replace(cfg, max_steps=20), run_dir, resume=True)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert second.step == 20 and [r["step"] for r in records] == list(range(1, 21))
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    model, _, _ = load_model(run_dir, device="cuda")
    assert next(model.parameters()).is_cuda
