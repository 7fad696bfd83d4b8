"""`aimass export`: a checkpoint or run → a model package.

Registration is cheap (argparse only); the handler imports torch and the exporters when it runs.
Prints the package path on stdout and one parity line per target on stderr (parity.summary:
perplexity, top-1 agreement and KL divergence on the held-out text, then greedy agreement). Exit codes: 0 done,
2 bad input or a failed parity check (one line on stderr), 130 Ctrl-C (nothing left behind).
"""

from __future__ import annotations

import argparse
import sys

from aimass_common.cli import fail
from exporters.errors import ExportError
from registry.manifest import load
from trainer.cli import resolve_model
from trainer.errors import TrainerError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="export a checkpoint or run as a model package (ONNX, quantized, TensorRT)"
    )
    p.add_argument(
        "model", metavar="CKPT_OR_RUN", help="a checkpoint folder, a run folder or a bundled model"
    )
    p.add_argument(
        "--targets",
        default="onnx-fp32",
        help="comma-separated: onnx-fp32, onnx-int4, onnx-int8, onnx-portable-fp32, trt-fp16; "
        "onnx-fp32-kv16, onnx-int4-kv16, onnx-int8-kv16 hold the KV cache in float16 "
        "(default onnx-fp32)",
    )
    p.add_argument("--out", required=True, metavar="PKG", help="package folder to create")
    p.add_argument(
        "--force",
        action="store_true",
        help="keep a quantized target that fails its fidelity gate (perplexity, top-1 "
        "agreement; recorded as forced)",
    )
    p.add_argument("--max-len", type=int, help="context the graphs serve (default: the model's)")
    p.add_argument("--threads", type=int, help="ONNX Runtime threads for the parity check")
    p.set_defaults(func=_export)


def _export(args: argparse.Namespace) -> int:
    from exporters.package import export  # torch: registration stays instant for --help
    from exporters.parity import summary  # torch

    if args.threads is not None and args.threads < 1:
        return fail(f"--threads={args.threads} must be >= 1")
    try:
        path = export(
            resolve_model(args.model),
            args.targets.split(","),
            args.out,
            force=args.force,
            max_len=args.max_len,
            threads=args.threads,
            on_progress=lambda msg: print(msg, file=sys.stderr, flush=True),
        )
    except (ExportError, TrainerError) as e:
        return fail(str(e))
    for report in load(path).reports.parity.values():
        print(summary(report), file=sys.stderr)
    print(path)
    return 0
