"""llama.cpp's own tools for benchmarks/peers.py: built from source once, its quantizer, its
server as a subprocess, and `llama-perplexity`'s KL-divergence figures (run and parsed), with a
reader for the base log-probabilities file it writes.

The source is the llama.cpp tree vendored in the llama-cpp-python sdist (`pip download
--no-binary :all: --no-deps llama-cpp-python`), built with CMake for this CPU (GGML_NATIVE) into
$AIMASS_HOME/peers/llama.cpp-<sdist version>/ and reused while its binaries are there. Nothing
is fetched during the build: no curl, no OpenSSL, no prebuilt web UI.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks._common import free_port, stop, wait_http

SDIST = "llama-cpp-python"
TOOLS = ("llama-server", "llama-quantize", "llama-perplexity")
CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",  # this CPU's vector extensions, as a user building it here gets
    # but not AMX: on the VMs here ggml's AMX matmul crashes llama-server at its first graph
    # (SIGSEGV in ggml_backend_amx_mul_mat, seen with the tree of llama-cpp-python 0.3.36);
    # AVX-512 and VNNI stay on
    "-DCMAKE_C_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16",
    "-DCMAKE_CXX_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",  # else the server's web UI is downloaded at build time
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DBUILD_SHARED_LIBS=OFF",  # self-contained binaries: the cache folder can move
)
BUILD_RECORD = "build.json"


@dataclass
class LlamaCpp:
    root: Path  # $AIMASS_HOME/peers/llama.cpp-<version>
    version: str  # the llama-cpp-python sdist's version
    reports: str  # what `llama-server --version` says (llama.cpp's build number and commit)
    build_s: float | None  # how long the build took, when recorded
    built_now: bool

    def tool(self, name: str) -> Path:
        return self.root / "build" / "bin" / name


def _version_key(folder: Path) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"[.-]", folder.name)[1:])


def _built(root: Path) -> bool:
    return all((root / "build" / "bin" / t).is_file() for t in TOOLS)


def ensure_built(peers_dir: Path, jobs: int = 2) -> LlamaCpp:
    """The newest cached build under `peers_dir`, else the sdist downloaded, unpacked and built
    (many minutes on 2 cores)."""
    cached = sorted((p for p in peers_dir.glob("llama.cpp-*") if _built(p)), key=_version_key)
    if cached:
        root = cached[-1]
        record = (
            json.loads((root / BUILD_RECORD).read_text()) if (root / BUILD_RECORD).is_file() else {}
        )
        return LlamaCpp(
            root, root.name.split("-", 1)[1], _reports(root), record.get("build_s"), False
        )
    sdist = _download(peers_dir / "sdist")
    version = sdist.name.removeprefix("llama_cpp_python-").removesuffix(".tar.gz")
    root = peers_dir / f"llama.cpp-{version}"
    source = _unpack(sdist, root)
    print(f"building {', '.join(TOOLS)} from {source} (once; many minutes)", flush=True)
    start = time.monotonic()
    with open(root / "build.log", "ab") as log:
        run = dict(stdout=log, stderr=subprocess.STDOUT, check=True)
        subprocess.run(
            ["cmake", "-S", str(source), "-B", str(root / "build"), *CMAKE_OPTIONS], **run
        )
        subprocess.run(
            [
                "cmake",
                "--build",
                str(root / "build"),
                "--config",
                "Release",
                "--target",
                *TOOLS,
                "-j",
                str(jobs),
            ],
            **run,
        )
    build_s = time.monotonic() - start
    record = {"version": version, "build_s": build_s, "cmake": list(CMAKE_OPTIONS), "jobs": jobs}
    (root / BUILD_RECORD).write_text(json.dumps(record, indent=2))
    return LlamaCpp(root, version, _reports(root), build_s, True)


def _download(folder: Path) -> Path:
    found = sorted(folder.glob("llama_cpp_python-*.tar.gz"))
    if not found:
        folder.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-binary",
            ":all:",
            "--no-deps",
            SDIST,
            "-d",
            str(folder),
        ]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        found = sorted(folder.glob("llama_cpp_python-*.tar.gz"))
    return found[-1]


def _unpack(sdist: Path, root: Path) -> Path:
    """root/<sdist folder>/vendor/llama.cpp, unpacking only that tree (the rest is Python)."""
    top = sdist.name.removesuffix(".tar.gz")
    source = root / top / "vendor" / "llama.cpp"
    if not (source / "CMakeLists.txt").is_file():
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(f"{top}/vendor/llama.cpp/")]
            tar.extractall(root, members=members, filter="data")
    return source


def _reports(root: Path) -> str:
    out = subprocess.run(
        [str(root / "build" / "bin" / "llama-server"), "--version"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = [
        ln for ln in (out.stdout + out.stderr).splitlines() if ln.startswith(("version", "built"))
    ]
    return "; ".join(lines)


def quantize(llama: LlamaCpp, src: Path, dst: Path, kind: str, threads: int) -> Path:
    """`llama-quantize --allow-requantize SRC DST KIND` once (kept while DST exists)."""
    if not dst.is_file():
        tmp = dst.with_suffix(".partial")
        cmd = [
            str(llama.tool("llama-quantize")),
            "--allow-requantize",
            str(src),
            str(tmp),
            kind,
            str(threads),
        ]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(f"llama-quantize {kind} failed:\n{out.stderr[-2000:]}")
        tmp.rename(dst)
    return dst


class LlamaServer:
    """llama.cpp's server on one GGUF file, continuous batching over `slots` slots."""

    def __init__(self, llama: LlamaCpp, gguf: Path, threads: int, slots: int, ctx: int, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [
            str(llama.tool("llama-server")),
            "-m",
            str(gguf),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "-t",
            str(threads),
            "-tb",
            str(threads),
            "-np",
            str(slots),
            "-c",
            str(ctx),
            "--cont-batching",
            "--no-webui",
        ]
        with open(log, "ab") as f:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(self.cmd, stdout=f, stderr=subprocess.STDOUT)
        wait_http(self.url + "/health", self.proc)

    def close(self) -> None:
        stop(self.proc)


# ── fidelity: llama-perplexity --kl-divergence ──

# the summary lines llama-perplexity prints (tools/perplexity/perplexity.cpp), by our key
_PATTERNS = {
    "ppl": r"Mean PPL\(Q\)\s*:\s*([-\d.eE+]+)",
    "ppl_base": r"Mean PPL\(base\)\s*:\s*([-\d.eE+]+)",
    "ln_ppl_ratio": r"Mean ln\(PPL\(Q\)/PPL\(base\)\)\s*:\s*([-\d.eE+]+)",
    "kl_mean": r"Mean\s+KLD:\s*([-\d.eE+]+)",
    "kl_max": r"Maximum KLD:\s*([-\d.eE+]+)",
    "kl_p99": r"99\.0%\s+KLD:\s*([-\d.eE+]+)",
    "kl_median": r"Median\s+KLD:\s*([-\d.eE+]+)",
    "same_top": r"Same top p:\s*([-\d.eE+]+)\s*±",
}
_FINAL_PPL = r"Final estimate: PPL = ([-\d.eE+]+)"


def parse_kl_output(text: str) -> dict:
    """The figures of a `llama-perplexity --kl-divergence` run (same_top as a fraction), or of a
    base run (`ppl` from its final estimate only). Raises ValueError when neither is there."""
    out = {}
    for key, pattern in _PATTERNS.items():
        m = re.search(pattern, text)
        if m:
            out[key] = float(m.group(1))
    if "same_top" in out:
        out["same_top"] /= 100.0
    if "ppl" not in out:
        m = re.search(_FINAL_PPL, text)
        if m is None:
            raise ValueError("no perplexity in llama-perplexity's output")
        out["ppl"] = float(m.group(1))
    return out


def perplexity(
    llama: LlamaCpp, gguf: Path, text: Path, ctx: int, threads: int, base: Path, write_base: bool
) -> tuple[dict, str]:
    """Writes `base` (the reference's log-probabilities) or compares `gguf` against it; returns
    the parsed figures and the raw output."""
    cmd = [
        str(llama.tool("llama-perplexity")),
        "-m",
        str(gguf),
        "-f",
        str(text),
        "-c",
        str(ctx),
        "-b",
        str(ctx),
        "-t",
        str(threads),
        "--kl-divergence-base",
        str(base),
    ]
    if not write_base:
        cmd.append("--kl-divergence")
    out = subprocess.run(cmd, capture_output=True, text=True)
    raw = out.stdout + out.stderr
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{raw[-3000:]}")
    return parse_kl_output(raw), raw


@dataclass
class KlBase:
    """A `--kl-divergence-base` file: the chunks of tokens and, for the second half of each, the
    reference's log-softmax stored in 16 bits (a scale and an offset per position)."""

    path: Path
    n_ctx: int
    n_vocab: int
    tokens: np.ndarray  # (n_chunk, n_ctx) int32

    @property
    def first(self) -> int:  # positions before it are context only, as llama.cpp scores
        return self.n_ctx // 2

    @property
    def scored(self) -> int:  # positions scored per chunk
        return self.n_ctx - 1 - self.first

    @classmethod
    def read(cls, path: Path) -> KlBase:
        with open(path, "rb") as f:
            if f.read(8) != b"_logits_":
                raise ValueError(f"{path} is not a llama-perplexity log-probabilities file")
            n_ctx, n_vocab, n_chunk = np.frombuffer(f.read(12), dtype=np.int32)
            tokens = np.frombuffer(f.read(4 * n_ctx * n_chunk), dtype=np.int32)
        return cls(path, int(n_ctx), int(n_vocab), tokens.reshape(int(n_chunk), int(n_ctx)))

    def log_probs(self, chunk: int) -> np.ndarray:
        """(scored, n_vocab) float32: the reference's log-probabilities as llama.cpp reads them
        back (values below its 16-nat floor come back as the floor)."""
        nv = 2 * ((self.n_vocab + 1) // 2) + 4
        offset = 20 + 4 * self.tokens.size + 2 * nv * self.scored * chunk
        raw = np.fromfile(self.path, dtype=np.uint16, count=nv * self.scored, offset=offset)
        raw = raw.reshape(self.scored, nv)
        head = raw[:, :4].copy().view(np.float32)  # (scored, 2): scale, min_log_prob
        return head[:, :1] * raw[:, 4 : 4 + self.n_vocab] + head[:, 1:2]


def kl_figures(base: KlBase, chunk_logits, bos: int | None) -> dict:
    """llama.cpp's `--kl-divergence` figures for a model whose logits for a chunk's tokens
    `chunk_logits(ids) -> (n_ctx, V)` gives, against the base file: the same positions, the same
    16-bit reference, the same 16-nat floor, the same percentile rule."""
    nll, nll_base, kld, same = [], [], [], 0
    for c in range(base.tokens.shape[0]):
        ids = base.tokens[c].tolist()
        if bos is not None:
            ids[0] = (
                bos  # llama-perplexity evaluates each chunk after a BOS when the vocab adds one
            )
        logits = np.asarray(chunk_logits(ids), dtype=np.float64)[base.first : base.n_ctx - 1]
        logp = logits - logits.max(axis=1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(axis=1, keepdims=True))  # (scored, V)
        ref = base.log_probs(c).astype(np.float64)
        targets = base.tokens[c, base.first + 1 : base.n_ctx]
        rows = np.arange(len(targets))
        nll.append(-logp[rows, targets])
        nll_base.append(-ref[rows, targets])
        terms = np.where(ref > -16.0, np.exp(ref) * (ref - logp), 0.0)
        kld.append(terms.sum(axis=1))
        same += int((logits.argmax(axis=1) == ref.argmax(axis=1)).sum())
    nll, nll_base, kld = (np.concatenate(x) for x in (nll, nll_base, kld))
    ordered = np.sort(kld)
    return {
        "ppl": float(np.exp(nll.mean())),
        "ppl_base": float(np.exp(nll_base.mean())),
        "ln_ppl_ratio": float((nll - nll_base).mean()),
        "kl_mean": float(kld.mean()),
        "kl_median": float(np.median(kld)),
        "kl_p99": _percentile(ordered, 0.99),
        "kl_max": float(ordered[-1]),
        "same_top": same / len(kld),
        "positions": len(kld),
    }


def _percentile(ordered: np.ndarray, fraction: float) -> float:
    """perplexity.cpp's rule: linear between the two nearest of the sorted values."""
    p = fraction * (len(ordered) - 1)
    i = int(p)
    return float((1 - (p - i)) * ordered[i] + (p - i) * ordered[min(i + 1, len(ordered) - 1)])
