"""The `aimass` command: each package registers its own subcommands.

A package adds commands through the `aimass.commands` entry-point group (see pyproject.toml):
the entry point is a function `register(subparsers)` that adds parsers whose `func` default
takes the parsed arguments and returns an exit code. Registration must stay cheap (no torch
import), so `aimass --help` is instant; the handlers import what they need and turn their
package's errors into one line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import os
import sys
from importlib.metadata import entry_points

from aimass_common.cli import fail
from engine.errors import EngineError
from engine.request import EngineRequest, SamplingParams
from trainer import cli as trainer_cli
from trainer.cli import add_generate_arguments
from trainer.errors import TrainerError
from trainer.tokenizer import Tokenizer


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aimass",
        description="From a text corpus to a fast, safe, promoted text-generation API.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for ep in sorted(entry_points(group="aimass.commands"), key=lambda e: e.name):
        ep.load()(subparsers)
    _register_generate(subparsers)
    return parser


def _register_generate(subparsers) -> None:
    # `generate` spans packages (a checkpoint runs in the trainer, a model package in its
    # compiled runtime), so it lives here, the one place allowed to import them all.
    p = subparsers.add_parser(
        "generate", help="generate text from a checkpoint, run or model package"
    )
    p.add_argument(
        "model",
        metavar="MODEL",
        help="a checkpoint or run folder, a model package, or a bundled model name",
    )
    p.add_argument(
        "--target", help="package target to run (default: the fastest this machine can run)"
    )
    p.add_argument(
        "--stop",
        action="append",
        metavar="STR",
        help="stop before this text (repeatable; model packages only)",
    )
    add_generate_arguments(p)
    p.set_defaults(func=_generate)


def _generate(args: argparse.Namespace) -> int:
    from exporters.package import is_package  # torch (parity): only `generate` needs it

    if not is_package(args.model):
        if args.target or args.stop:
            flag = "--target" if args.target else "--stop"
            return fail(f"{flag} applies to model packages only")
        return trainer_cli.generate_from_checkpoint(args)
    return _generate_from_package(args)


def _generate_from_package(args: argparse.Namespace) -> int:
    """A model package runs through the engine (one slot), as the gateway runs it."""
    from engine.loader import EngineConfig, LoadError, open_core  # onnxruntime, for packages only

    try:
        tokenizer = Tokenizer.load(args.model)
        prompt = tokenizer.encode(trainer_cli.prompt_text(tokenizer, args))
        sampling = SamplingParams(
            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed
        )
        _check_sampling(args)
        core, info = open_core(args.model, EngineConfig(target=args.target, n_slots=1))
        core.add(
            EngineRequest(
                request_id="cli",
                prompt_token_ids=tuple(prompt),
                max_tokens=args.max_tokens,
                stop_token_ids=info.stop_ids,
                sampling=sampling,
                stop=tuple(args.stop or ()),
            )
        )
        while core.has_work():
            for out in core.step():
                if out.finish_reason == "error":  # the engine ended this request alone
                    raise EngineError(out.error)
                sys.stdout.write(out.text)
                sys.stdout.flush()
        sys.stdout.write("\n")
    except (LoadError, EngineError, TrainerError, ValueError) as e:
        return fail(str(e))
    return 0


def _check_sampling(args: argparse.Namespace) -> None:
    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens={args.max_tokens} must be >= 1")
    if args.temperature < 0:
        raise ValueError(f"--temperature={args.temperature} must be >= 0")
    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p={args.top_p} must be in (0, 1]")
    if args.top_k < 0:
        raise ValueError(f"--top-k={args.top_k} must be >= 0")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `aimass ... | head` closed the pipe: stop quietly, as other command-line tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
