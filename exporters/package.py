"""Checkpoint → model package: every artifact built, parity-checked and listed, or nothing at all.

    export(CKPT, ["onnx-fp32", "onnx-int4"], PKG)

    PKG/.staging ─ build each target ─ parity vs eager ─ tokenizer ─ manifest.json ─ fsync ─┐
    PKG  ◄──────────────────────────── os.replace ◄───────────────────────────────────────┘

The package is assembled in a staging folder next to PKG and renamed into place in one step;
any failure (Ctrl-C included) removes the staging folder, so a failed export leaves no PKG.
What a target is comes from TARGETS (flavour, runtime, dtype, quantization, exactness), never
from parsing its name.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

from aimass_common.files import publish_dir, sha256_file
from engine.loader import LoadError
from engine.loader import choose_artifact as _engine_choose
from exporters import targets as _targets
from exporters.errors import ExportError, ParityError
from exporters.parity import Decoder, ParityReport, check_parity, held_out_text
from registry.manifest import (
    MANIFEST,
    Artifact,
    FileEntry,
    GenerationDefaults,
    Lineage,
    Manifest,
    ManifestError,
    ModelSpec,
    Reports,
    TokenizerSpec,
    check_files,
    encode,
    file_entry,
    load,
)
from trainer.checkpoint import code_revision, load_model, resolve
from trainer.errors import TrainerError

CHAT_TEMPLATE_FILE = "chat_template.jinja"


def export(
    checkpoint_or_run: str | Path,
    targets: Sequence[str],
    out_dir: str | Path,
    *,
    force: bool = False,
    max_len: int | None = None,
    threads: int | None = None,
    on_progress: Callable[[str], None] | None = None,
) -> Path:
    """Builds a model package at `out_dir` holding one artifact per target; returns its path.

    `force` keeps a quantized artifact that fails the fidelity gate (parity.gate_failure:
    perplexity, top-1 agreement; the report records it as forced); an exact target that
    diverges always fails. `max_len` is the context the graphs serve (default: the model's).
    Raises ExportError; a failure leaves no `out_dir`.
    """
    progress = on_progress or (lambda _msg: None)
    specs = _targets.parse_targets(targets)
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    _targets.check_runtimes(specs)
    folder, model, tokenizer, meta = _load_checkpoint(checkpoint_or_run)
    max_len = _check_max_len(max_len, model.cfg.max_seq_len)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.staging-", dir=out_dir.parent))
    try:
        held_out = held_out_text(folder, tokenizer, max_len)
        build = _targets.Build(model=model, max_len=max_len, root=staging, checkpoint=folder)
        artifacts, reports = [], {}
        for target, spec in specs.items():
            progress(f"building {target}")
            artifact = _targets.build_artifact(build, target, spec)
            progress(f"checking parity of {target} against eager PyTorch")
            decoder = _targets.DECODERS[spec.runtime](staging / artifact.entry, max_len, threads)
            report = check_parity(
                model,
                tokenizer,
                decoder,
                target,
                exact=spec.exact,
                max_len=max_len,
                held_out=held_out,
            )
            reports[target] = _gate(report, spec, force)
            artifacts.append(artifact)
        manifest = Manifest(
            model=_model_spec(model.cfg),
            max_context=max_len,
            tokenizer=_write_tokenizer(tokenizer, staging),
            generation=GenerationDefaults(
                max_tokens=min(256, max_len), stop_ids=list(tokenizer.stop_ids)
            ),
            lineage=_lineage(folder, meta),
            created_at=datetime.now(UTC),
            artifacts=artifacts,
            reports=Reports(parity=reports),
        )
        (staging / MANIFEST).write_bytes(encode(manifest))
        publish_dir(staging, out_dir)  # out_dir is missing or empty (checked before)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir.resolve()


def is_package(path: str | Path) -> bool:
    """A folder with a manifest.json (it may still fail to load; load() says why)."""
    return (Path(path) / MANIFEST).is_file()


def choose_artifact(manifest: Manifest, target: str | None = None) -> Artifact:
    """The engine's choice (engine.loader.choose_artifact), as an ExportError."""
    try:
        return _engine_choose(manifest, target)
    except LoadError as e:
        raise ExportError(str(e)) from None


def open_decoder(
    pkg_dir: str | Path, target: str | None = None, *, threads: int | None = None
) -> tuple[Decoder, Artifact]:
    """The decoder of a package's artifact (see choose_artifact), after checking its files
    against the manifest. Raises ExportError."""
    try:
        manifest = load(pkg_dir)
        artifact = choose_artifact(manifest, target)
    except ManifestError as e:
        raise ExportError(str(e)) from None
    problems = check_files(pkg_dir, artifact.files)
    if problems:
        raise ExportError(f"{pkg_dir} is damaged: {'; '.join(problems)}")
    decoder = _targets.DECODERS[artifact.runtime](
        Path(pkg_dir) / artifact.entry, artifact.max_len, threads
    )
    return decoder, artifact


def check_generation_length(artifact: Artifact, n_prompt: int, max_tokens: int) -> None:
    if n_prompt < 1:
        raise ExportError("prompt is empty: it must hold at least one token")
    if max_tokens < 1 or n_prompt + max_tokens > artifact.max_len:
        raise ExportError(
            f"prompt ({n_prompt} tokens) + max_tokens ({max_tokens}) must be between "
            f"{n_prompt + 1} and the {artifact.target} context of {artifact.max_len}"
        )


def generate_from_package(
    pkg_dir: str | Path,
    prompt_ids: list[int],
    max_tokens: int,
    target: str | None = None,
    stop_ids: Sequence[int] = (),
    *,
    threads: int | None = None,
) -> list[int]:
    """Greedy decoding with a package's artifact. Returns the new token ids (a stop id ends
    it, not returned)."""
    decoder, artifact = open_decoder(pkg_dir, target, threads=threads)
    check_generation_length(artifact, len(prompt_ids), max_tokens)
    return list(decoder.greedy(list(prompt_ids), max_tokens, stop_ids=tuple(stop_ids)))


# --- validation ---------------------------------------------------------------------------------


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ExportError(f"{out_dir} already exists and is not empty; choose another --out")
    parent = next((p for p in out_dir.absolute().parents if p.exists()), None)
    if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ExportError(f"cannot write {out_dir}: {parent} is not a writable folder")


def _load_checkpoint(path: str | Path):
    try:
        folder = resolve(path)
        model, tokenizer, meta = load_model(folder)
    except TrainerError as e:
        raise ExportError(f"cannot export {path}: {e}") from None
    return folder, model, tokenizer, meta


def _check_max_len(max_len: int | None, model_max: int) -> int:
    if max_len is None:
        return model_max
    if not 2 <= max_len <= model_max:
        raise ExportError(
            f"--max-len={max_len} must be between 2 and the model's context {model_max}"
        )
    return max_len


def _gate(report: ParityReport, spec: _targets.TargetSpec, force: bool) -> ParityReport:
    """Fails the export on a failed report, unless `force`, the target is not exact and its
    numbers are finite (a graph that yields NaN is broken, not degraded)."""
    if report.passed:
        return report
    finite = all(map(math.isfinite, (report.max_abs_logit_diff, report.ppl_target)))
    forceable = not spec.exact and finite
    if force and forceable:
        report.forced = True
        return report
    hint = " (--force exports it anyway, recorded as forced)" if forceable else ""
    raise ParityError(f"{report.target} failed its parity check: {report.reason}{hint}")


# --- package files ------------------------------------------------------------------------------


def _write_tokenizer(tokenizer, root: Path) -> TokenizerSpec:
    tokenizer.save(root)
    names = ["tokenizer.json", "tokenizer_config.json"]
    if tokenizer.chat_template is not None:
        (root / CHAT_TEMPLATE_FILE).write_text(tokenizer.chat_template, encoding="utf-8")
        names.append(CHAT_TEMPLATE_FILE)
    files: list[FileEntry] = [file_entry(root, name) for name in names]
    return TokenizerSpec(
        files=files,
        eos_token=tokenizer.eos_token,
        eos_id=tokenizer.eos_id,
        bos_token=tokenizer.bos_token,
        bos_id=tokenizer.bos_id,
        pad_token=tokenizer.pad_token,
        pad_id=tokenizer.pad_id,
        stop_tokens=list(tokenizer.stop_tokens),
        stop_ids=list(tokenizer.stop_ids),
        chat_template=tokenizer.chat_template,
        chat_template_file=CHAT_TEMPLATE_FILE if tokenizer.chat_template is not None else None,
    )


def _model_spec(cfg) -> ModelSpec:
    return ModelSpec(
        architecture="llama",
        vocab_size=cfg.vocab_size,
        dim=cfg.dim,
        n_layers=cfg.n_layers,
        n_heads=cfg.n_heads,
        n_kv_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,
        ffn_dim=cfg.ffn_dim,
        rope_theta=cfg.rope_theta,
        norm_eps=cfg.norm_eps,
        tie_embeddings=cfg.tie_embeddings,
    )


def _lineage(folder: Path, meta: dict) -> Lineage:
    lineage = meta.get("lineage") or {}
    return Lineage(
        base_model=lineage.get("base_model"),
        dataset_sha256=lineage.get("dataset_sha256"),
        code_revision=lineage.get("code_revision"),
        run=lineage.get("run"),
        checkpoint=str(folder),
        checkpoint_sha256=sha256_file(folder / "model.safetensors"),
        checkpoint_step=meta.get("step"),
        export_code_revision=code_revision(),
    )
