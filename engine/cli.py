"""`aimass engine serve PACKAGE`: the engine server (engine.server) of one model package."""

from __future__ import annotations

import argparse
import asyncio
import signal

from aimass_common.cli import fail


def register(subparsers) -> None:
    engine = subparsers.add_parser("engine", help="run a model package's engine")
    commands = engine.add_subparsers(dest="engine_command", metavar="COMMAND", required=True)
    p = commands.add_parser(
        "serve", help="serve a package's engine over TCP to gateways (engine server)"
    )
    p.add_argument("package", metavar="PACKAGE", help="a model package folder")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8100, help="port (0 picks a free one)")
    add_engine_arguments(p)
    p.set_defaults(func=_serve)


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--target",
        help="package target, e.g. onnx-int4 or trt-fp16 (default: the fastest ONNX one)",
    )
    p.add_argument(
        "--provider",
        choices=["cpu", "cuda", "tensorrt"],
        default="cpu",
        help="ONNX Runtime execution provider of an ONNX target (a plan runs on TensorRT)",
    )
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: all)")
    p.add_argument("--slots", type=int, default=32, help="sequences decoded together")
    p.add_argument("--max-len", type=int, help="tokens per slot (default: the target's)")
    p.add_argument(
        "--kv-tokens",
        type=int,
        help="KV cache positions the slots share; a request starts while its prompt + "
        "max_tokens fit (default: slots × max-len / 4)",
    )
    p.add_argument("--token-budget", type=int, default=256, help="tokens per step")
    p.add_argument("--max-waiting", type=int, default=256, help="queued requests at most")
    p.add_argument(
        "--spin-wait",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="ONNX Runtime threads spin between parallel sections (--no-spin-wait frees the "
        "cores for the HTTP server on a small machine)",
    )
    p.add_argument(
        "--huge-pages",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="back the weights with 2 MiB transparent huge pages (Linux)",
    )
    p.add_argument(
        "--prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="keep finished requests' cached tokens while their slots are free; a prompt "
        "that starts with them copies them instead of computing them",
    )
    p.add_argument(
        "--speculative-tokens",
        type=int,
        default=0,
        metavar="K",
        help="draft up to K tokens per step from the request's own prompt and output "
        "(n-gram lookup), verified in the same forward; 0 is off",
    )
    p.add_argument(
        "--max-prefill-tokens",
        type=int,
        default=0,
        metavar="N",
        help="prompt tokens per step while any stream decodes, which bounds the streams' "
        "inter-token gap while long prompts arrive; 0 is what the token budget leaves",
    )
    p.add_argument(
        "--mixed-forwards",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="run decodes and prompt chunks of different lengths in one packed forward "
        "(projections on real tokens only) where that costs less than separate ones "
        "(ONNX targets)",
    )


def engine_config(args: argparse.Namespace):
    # deferred: engine.loader loads onnxruntime, which `aimass --help` must not wait for
    from engine.loader import EngineConfig

    return EngineConfig(
        target=args.target,
        provider=args.provider,
        threads=args.threads,
        n_slots=args.slots,
        max_len=args.max_len,
        kv_tokens=args.kv_tokens,
        token_budget=args.token_budget,
        max_waiting=args.max_waiting,
        spin_wait=args.spin_wait,
        huge_pages=args.huge_pages,
        prefix_caching=args.prefix_caching,
        speculative_tokens=args.speculative_tokens,
        max_prefill_tokens=args.max_prefill_tokens,
        mixed_forwards=args.mixed_forwards,
    )


def _serve(args: argparse.Namespace) -> int:
    # deferred: the loader and server load onnxruntime, which `aimass --help` must not wait for
    from engine.loader import LoadError, load_engine
    from engine.server import EngineServer

    if not 0 <= args.port <= 65535:
        return fail(f"--port={args.port} must be in 0..65535")
    try:
        engine = load_engine(args.package, engine_config(args))
    except (LoadError, ValueError) as e:
        return fail(str(e))

    async def main() -> None:
        server = EngineServer(engine)
        port = await server.start(args.host, args.port)
        info = engine.info
        print(
            f"engine server for {info.model} ({info.target} on {info.provider}, "
            f"{info.n_slots} slots × {info.max_len} tokens) listening on {args.host}:{port}; "
            f"{engine.core.runner.huge_pages.describe()}",
            flush=True,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        serving = asyncio.create_task(server.serve_forever())
        await stop.wait()
        serving.cancel()
        await server.close()

    try:
        asyncio.run(main())
    except OSError as e:
        return fail(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}")
    return 0
