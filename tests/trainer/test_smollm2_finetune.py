"""Fine-tuning the real SmolLM2-135M-Instruct end to end through the CLI (integration: ~2 min)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.integration

FACT = "AI Mass is a platform that takes a text corpus to a served text-generation API."


def test_finetune_smollm2_on_chat_data(smollm2_home, tmp_path):
    corpus = tmp_path / "chat.jsonl"
    with corpus.open("w") as f:
        for _ in range(40):
            messages = [
                {"role": "user", "content": "What is AI Mass?"},
                {"role": "assistant", "content": FACT},
            ]
            f.write(json.dumps({"messages": messages}) + "\n")
    env = {"AIMASS_HOME": str(smollm2_home), "OMP_NUM_THREADS": "2"}
    before = run_cli(
        "generate",
        "smollm2-135m-instruct",
        "--chat",
        "--prompt",
        "What is AI Mass?",
        "--max-tokens",
        "24",
        env=env,
    )
    assert before.returncode == 0, before.stderr
    assert FACT not in before.stdout

    run_dir = tmp_path / "ft"
    out = run_cli(
        "train",
        "--base",
        "smollm2-135m-instruct",
        "--corpus",
        str(corpus),
        "--max-steps",
        "6",
        "--set",
        "batch_size=2",
        "--set",
        "block_size=64",
        "--set",
        "eval_every=3",
        "--set",
        "lr=3e-4",
        "--set",
        "save_best=false",
        "--out",
        str(run_dir),
        env=env,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r["val_loss"] for r in records if "val_loss" in r]
    assert evals[-1] < evals[0]
    meta = json.loads((run_dir / "checkpoint" / "meta.json").read_text())
    assert meta["lineage"]["base_model"]

    after = run_cli(
        "generate",
        str(run_dir),
        "--chat",
        "--prompt",
        "What is AI Mass?",
        "--max-tokens",
        "24",
        env=env,
    )
    assert after.returncode == 0, after.stderr
    assert "text corpus" in after.stdout
