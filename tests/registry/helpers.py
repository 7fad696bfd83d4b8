"""Package folders for the registry tests, and the work the race tests' processes do
(module-level functions, so `spawn` processes can import them)."""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime
from pathlib import Path

from registry.manifest import (
    Artifact,
    Manifest,
    ModelSpec,
    ParityReport,
    Reports,
    TokenizerSpec,
    encode,
    file_entry,
)

# the architecture of the tiny test packages (trainer's `tiny` preset at dim 32)
TINY_SPEC = ModelSpec(
    architecture="llama",
    vocab_size=300,
    dim=32,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    head_dim=8,
    ffn_dim=64,
    rope_theta=10000.0,
    norm_eps=1e-5,
    tie_embeddings=True,
)


def write_package(
    root: Path,
    *,
    weights: bytes = b"weights" * 100,
    ppl: float = 10.0,
    parity_passed: bool = True,
    load_test: dict | None = None,
    eval_report: dict | None = None,
    extra: dict[str, bytes] | None = None,
) -> Path:
    """A package: tokenizer.json and one artifact (onnx-fp32: model.onnx + model.onnx.data)."""
    (root / "onnx-fp32").mkdir(parents=True)
    (root / "tokenizer.json").write_text('{"model": {"type": "BPE"}}')
    (root / "onnx-fp32" / "model.onnx").write_bytes(b"graph" * 20)
    (root / "onnx-fp32" / "model.onnx.data").write_bytes(weights)
    for name, data in (extra or {}).items():
        (root / name).write_bytes(data)
    parity = ParityReport(
        target="onnx-fp32",
        exact=True,
        prompts=[],
        tokens_matched=10,
        tokens_total=10,
        max_abs_logit_diff=1e-5,
        held_out="demo corpus tail",
        held_out_tokens=512,
        ppl_eager=ppl,
        ppl_target=ppl,
        ppl_increase=0.0,
        max_ppl_increase=0.05,
        passed=parity_passed,
        reason="" if parity_passed else "greedy tokens diverged at 3",
    )
    manifest = Manifest(
        name="tiny",
        model=TINY_SPEC,
        max_context=64,
        tokenizer=TokenizerSpec(
            files=[file_entry(root, "tokenizer.json")], eos_token="</s>", eos_id=0
        ),
        created_at=datetime(2026, 1, 1, tzinfo=UTC),
        artifacts=[
            Artifact(
                target="onnx-fp32",
                flavour="ort",
                runtime="onnxruntime",
                dtype="float32",
                entry="onnx-fp32/model.onnx",
                files=[
                    file_entry(root, "onnx-fp32/model.onnx"),
                    file_entry(root, "onnx-fp32/model.onnx.data"),
                ],
                max_len=64,
            )
        ],
        reports=Reports(parity={"onnx-fp32": parity}, eval=eval_report, load_test=load_test),
    )
    (root / "manifest.json").write_bytes(encode(manifest))
    return root


def tree(root: Path) -> dict[str, bytes]:
    """Every file under `root` by relative path: equal trees are equal bytes."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# ---- work done by the race tests' processes ----


def _start_together(at: float) -> None:
    """Processes start seconds apart (spawn imports); waiting for one instant makes them race."""
    time.sleep(max(0.0, at - time.time()))


def push_many(uri: str, package: str, name: str, n: int, at: float = 0) -> list[int]:
    from registry.registry import Registry

    reg = Registry.open(uri, user=f"pusher-{os.getpid()}")
    _start_together(at)
    return [reg.push(package, name).version for _ in range(n)]


def move_many(
    uri: str, name: str, alias: str, n: int, versions: list[int], at: float = 0
) -> tuple[list, int]:
    """Makes `n` successful moves of the alias, retrying each lost compare-and-swap."""
    from registry.errors import AliasConflict
    from registry.registry import Registry

    reg = Registry.open(uri, user=f"mover-{os.getpid()}")
    _start_together(at)
    moves, conflicts, i = [], 0, os.getpid()
    while len(moves) < n:
        got = reg.alias(name, alias)
        now = got[0].version if got else 0
        i += 1
        target = [v for v in versions if v != now][i % (len(versions) - 1)]
        try:
            move = reg.set_alias(name, alias, target, expect=now)
        except AliasConflict:
            conflicts += 1
            continue
        moves.append((move.from_version, move.version))
    return moves, conflicts


def pull_one(uri: str, ref: str, cache: str, at: float = 0) -> str:
    from registry.cache import pull
    from registry.registry import Registry

    reg = Registry.open(uri)
    _start_together(at)
    return str(pull(reg, ref, cache_dir=cache))
