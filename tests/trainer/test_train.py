"""The training loop in-process on a tiny model: metrics, checkpoints, exact resume, stops."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import tiny_overrides
from trainer import train
from trainer.checkpoint import load_model, resolve
from trainer.config import build_train_config
from trainer.errors import CheckpointError, TrainingDiverged


def start_run(corpus, run_dir, **extra):
    cfg = build_train_config("tiny", None, tiny_overrides(**extra))
    train.prepare_run(cfg, corpus, run_dir)
    return train.load_run_config(run_dir)


def losses(run_dir):
    return [
        json.loads(line)["train_loss"]
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
    ]


def test_lr_schedule():
    cfg = build_train_config(
        "tiny", None, {"lr": "1.0", "min_lr": "0.1", "warmup_steps": "10", "max_steps": "110"}
    )
    assert train.lr_at(0, cfg) == pytest.approx(0.1)
    assert train.lr_at(9, cfg) == pytest.approx(1.0)
    assert train.lr_at(60, cfg) == pytest.approx(0.55)
    assert train.lr_at(110, cfg) == pytest.approx(0.1)
    cfg = dataclasses.replace(cfg, decay_steps=110, max_steps=500)
    # extending a run keeps the original horizon: no jump back up
    assert train.lr_at(300, cfg) == pytest.approx(0.1)


def test_run_writes_metrics_checkpoints_and_charts(corpus_file, tmp_path):
    run_dir = tmp_path / "run"
    cfg = start_run(corpus_file, run_dir)
    result = train.run(cfg, run_dir)
    assert result.stop_reason == "max_steps" and result.step == 30
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 31))
    assert all(math.isfinite(r["train_loss"]) and r["tokens_per_s"] > 0 for r in records)
    assert [r["step"] for r in records if "val_loss" in r] == [10, 20, 30]
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    folder = resolve(run_dir)
    assert folder.name == "step-0000030"
    for name in (
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "meta.json",
        "train_state.pt",
    ):
        assert (folder / name).is_file(), name
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "step-0000020",
        "step-0000030",
    ]
    for chart in ("loss.png", "lr.png", "throughput.png"):
        assert (run_dir / chart).read_bytes()[:4] == b"\x89PNG"
    meta = json.loads((folder / "meta.json").read_text())
    dataset = json.loads((run_dir / "data" / "dataset.json").read_text())
    assert meta["lineage"]["dataset_sha256"] == dataset["tokens_sha256"]
    assert meta["step"] == 30 and meta["val_loss"] == records[-1]["val_loss"]
    model, tokenizer, _ = load_model(run_dir)
    assert model.cfg.vocab_size == tokenizer.vocab_size
    assert (run_dir / "best" / "model.safetensors").is_file()


def test_interrupted_and_resumed_run_matches_uninterrupted(corpus_file, tmp_path):
    straight = tmp_path / "straight"
    cfg = start_run(corpus_file, straight)
    train.run(cfg, straight)

    resumed = tmp_path / "resumed"
    cfg = start_run(corpus_file, resumed)

    def sigterm_at_13(tr):
        if tr.step == 13:
            os.kill(os.getpid(), signal.SIGTERM)

    first = train.run(cfg, resumed, on_step=sigterm_at_13)
    assert (
        first.stop_reason == "interrupted" and first.step == 14
    )  # the signal lands during step 14's hook
    assert resolve(resumed).name == "step-0000014"
    second = train.run(train.load_run_config(resumed), resumed, resume=True)
    assert second.step == 30 and second.stop_reason == "max_steps"
    assert losses(resumed) == losses(straight)  # bit for bit
    a = load_file(str(resolve(straight) / "model.safetensors"))
    b = load_file(str(resolve(resumed) / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_more_steps_continues(corpus_file, tmp_path):
    run_dir = tmp_path / "run"
    cfg = start_run(corpus_file, run_dir, max_steps=10)
    train.run(cfg, run_dir)
    cfg = dataclasses.replace(train.load_run_config(run_dir), max_steps=20)
    result = train.run(cfg, run_dir, resume=True)
    assert result.step == 20
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 21))
    assert all(r["lr"] == pytest.approx(cfg.min_lr) for r in records[10:])


def test_early_stopping_on_plateau(corpus_file, tmp_path):
    run_dir = tmp_path / "run"
    # an improvement must beat the best by 100 nats: the second evaluation never does
    cfg = start_run(corpus_file, run_dir, patience=1, min_delta=100.0, eval_every=5)
    result = train.run(cfg, run_dir)
    assert result.stop_reason == "early_stopping" and result.step == 10
    assert resolve(run_dir).name == "step-0000010"


def test_nan_loss_stops_clearly_and_keeps_last_checkpoint(corpus_file, tmp_path):
    run_dir = tmp_path / "run"
    cfg = start_run(corpus_file, run_dir)

    def poison_at_10(tr):
        if tr.step == 10:
            with torch.no_grad():
                tr.model.norm.weight.fill_(float("nan"))

    with pytest.raises(TrainingDiverged, match=r"became nan at step 11 .* last good checkpoint"):
        train.run(cfg, run_dir, on_step=poison_at_10)
    assert resolve(run_dir).name == "step-0000010"
    model, _, _ = load_model(run_dir)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_prepare_refuses_an_existing_run(corpus_file, tmp_path):
    run_dir = tmp_path / "run"
    start_run(corpus_file, run_dir, max_steps=1)
    with pytest.raises(CheckpointError, match="already exists; pass --resume"):
        start_run(corpus_file, run_dir)


def test_finetune_from_a_checkpoint(corpus_file, tmp_path):
    base = tmp_path / "base"
    train.run(start_run(corpus_file, base, max_steps=10), base)
    ft = tmp_path / "ft"
    base_model, _, _ = load_model(base)
    cfg = build_train_config(
        None,
        None,
        {"max_steps": "5", "eval_every": "5", "block_size": "32", "batch_size": "4"},
        base=str(resolve(base)),
        base_model=base_model.cfg,
    )
    train.prepare_run(cfg, corpus_file, ft)
    result = train.run(train.load_run_config(ft), ft)
    assert result.step == 5
    assert (ft / "tokenizer" / "tokenizer.json").read_bytes() == (
        resolve(base) / "tokenizer.json"
    ).read_bytes()
    meta = json.loads((resolve(ft) / "meta.json").read_text())
    assert meta["lineage"]["base_model"] == str(resolve(base))
    # a resumed fine-tune needs only its own checkpoint, and keeps its lineage
    shutil.rmtree(base)
    cfg = dataclasses.replace(train.load_run_config(ft), max_steps=8)
    assert train.run(cfg, ft, resume=True).step == 8
    assert json.loads((resolve(ft) / "meta.json").read_text())["lineage"] == meta["lineage"]
