"""`aimass train / generate` as a user runs them: real processes, exit codes, stderr lines."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, run_cli, tiny_overrides


def set_args(**extra) -> list[str]:
    overrides = tiny_overrides(**extra)
    overrides.pop("max_steps")
    return [arg for k, v in overrides.items() for arg in ("--set", f"{k}={v}")]


def test_help_lists_the_commands():
    out = run_cli("--help")
    assert out.returncode == 0
    for command in ("train", "import", "generate"):
        assert command in out.stdout


def test_train_resume_generate(corpus_file, tmp_path):
    run_dir = tmp_path / "RUN"
    out = run_cli(
        "train",
        "--corpus",
        str(corpus_file),
        "--preset",
        "tiny",
        "--max-steps",
        "20",
        "--out",
        str(run_dir),
        *set_args(),
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str((run_dir / "checkpoints" / "step-0000020").resolve())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 20 and "val_loss" in records[-1] and "train_loss" in records[0]
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (run_dir / "checkpoint" / name).is_file()
    assert list(run_dir.glob("*.png"))

    out = run_cli("train", "--resume", str(run_dir), "--max-steps", "30")
    assert out.returncode == 0, out.stderr
    steps = [
        json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == list(range(1, 31))

    greedy = [
        run_cli(
            "generate", str(run_dir), "--prompt", "The", "--max-tokens", "12", "--temperature", "0"
        )
        for _ in range(2)
    ]
    assert greedy[0].returncode == 0, greedy[0].stderr
    assert greedy[0].stdout == greedy[1].stdout and greedy[0].stdout.strip()

    from trainer.checkpoint import load_model
    from trainer.generate import generate

    model, tokenizer, _ = load_model(run_dir)
    expected = tokenizer.decode(
        generate(model, tokenizer.encode("The"), 12, stop_ids=tokenizer.stop_ids)
    )
    assert greedy[0].stdout == expected + "\n"

    chat = run_cli(
        "generate",
        str(run_dir / "checkpoint"),
        "--prompt",
        "Hi",
        "--max-tokens",
        "5",
        "--chat",
        "--temperature",
        "0.7",
        "--seed",
        "3",
    )
    assert chat.returncode == 0, chat.stderr


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("binary.txt", b"hello\x00\x01\x02", "binary.txt:1: binary file"),
        ("latin1.txt", b"line one\ncaf\xe9\n", "latin1.txt:2: not valid UTF-8"),
        ("bad.jsonl", b'{"text": "ok"}\n{"text": \n', "bad.jsonl:2"),
        ("missing.jsonl", b'{"text": "ok"}\n{"prompt": "x"}\n', "missing.jsonl:2"),
        ("empty.txt", b"   \n\n", "empty.txt"),
    ],
)
def test_bad_corpus_is_one_line_exit_2_and_leaves_nothing(tmp_path, name, content, expected):
    corpus = tmp_path / name
    corpus.write_bytes(content)
    run_dir = tmp_path / "RUN2"
    out = run_cli("train", "--corpus", str(corpus), "--preset", "tiny", "--out", str(run_dir))
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], out.stderr
    assert not run_dir.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".RUN2")]


def test_too_little_text_and_bad_settings(tmp_path):
    corpus = tmp_path / "short.txt"
    corpus.write_text("just a few words")
    out = run_cli("train", "--corpus", str(corpus), "--out", str(tmp_path / "r"))
    assert out.returncode == 2 and "too little text" in out.stderr and not (tmp_path / "r").exists()
    out = run_cli(
        "train", "--corpus", str(corpus), "--set", "batch_size=0", "--out", str(tmp_path / "r")
    )
    assert out.returncode == 2 and "batch_size=0 must be >= 1" in out.stderr
    out = run_cli("train", "--resume", str(tmp_path / "nothing"))
    assert out.returncode == 2 and "is not a training run" in out.stderr
    out = run_cli("generate", str(tmp_path), "--prompt", "x")
    assert out.returncode == 2 and "missing model.safetensors" in out.stderr


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_writes_a_checkpoint_then_exits(corpus_file, tmp_path, signum, code):
    """SIGTERM (a preempted pod) and a first Ctrl-C finish the step, checkpoint, exit 128+signal."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "aimass_cli", "train", "--corpus", str(corpus_file)]
    cmd += ["--max-steps", "100000", "--out", str(run_dir), *set_args(eval_every=100000)]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr
    assert "interrupted at step" in stderr
    step = json.loads((run_dir / "checkpoint" / "meta.json").read_text())["step"]
    assert step >= 3 and stdout.strip().endswith(f"step-{step:07d}")
    assert (run_dir / "checkpoint" / "train_state.pt").is_file()
