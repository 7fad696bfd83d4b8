"""What the HTTP benchmarks share: our gateway as a subprocess over a registry of its own, waiting
for a server to answer, a server process's resident memory, and the machine the run is on.

benchmarks/ is not a package of the project; its scripts import this as `benchmarks._common`
(the repository root is on their sys.path).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

from controlplane.access import CLI
from controlplane.db import Database
from controlplane.identity import create_project
from controlplane.keys import create_key
from registry.cache import pull
from registry.registry import Registry

# the instruction-set extensions that decide which kernels llama.cpp and ONNX Runtime pick
CPU_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    """Returns once `url` answers below 500; raises if `proc` exits or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:4]} exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout} s")


def serve_home(package: Path, home: Path, model: str) -> dict[str, str]:
    """A fresh AIMASS_HOME at `home` whose registry holds `package` as `model` (alias
    production, already pulled into the local cache) and an API key; returns the request headers
    that carry the key."""
    home.mkdir(parents=True)
    registry = Registry.open(str(home / "registry"))
    version = registry.push(package, model).version
    registry.set_alias(model, "production", version)
    pull(registry, model, cache_dir=home / "cache")  # "an unloaded model in the local cache"
    db = Database.open(f"sqlite:///{home / 'aimass.db'}")
    db.upgrade()
    with db.session() as s:
        _, key = create_key(s, CLI, create_project(s, CLI, "bench").id, ["inference"])
    db.close()
    return {"Authorization": f"Bearer {key}"}


class Gateway:
    """`aimass serve` in a subprocess over the registry under `home` (see serve_home); `args`
    gives threads, slots and spin_wait; `extra` more `aimass serve` options."""

    def __init__(self, home: Path, args, idle_unload: float = 600.0, extra: Sequence[str] = ()):
        self.home, self.port = home, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = os.environ | {"AIMASS_HOME": str(home), "OMP_NUM_THREADS": str(args.threads)}
        cmd = [
            sys.executable, "-m", "aimass_cli", "serve", "--port", str(self.port),
            "--threads", str(args.threads), "--slots", str(args.slots),
            "--max-waiting", "1024", "--rpm", "100000", "--tpm", "100000000",
            "--idle-unload", str(idle_unload),
            "--spin-wait" if args.spin_wait else "--no-spin-wait", *extra,
        ]  # fmt: skip
        with open(home / "gateway.log", "ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log)
        wait_http(self.url + "/healthz", self.proc)

    def close(self) -> None:
        stop(self.proc)


def stop(proc: subprocess.Popen) -> None:
    """SIGINT (a server's clean shutdown), then SIGKILL if it has not ended within 30 s."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def proc_status_kib(pid: int, field: str) -> int | None:
    """A `kB` line of /proc/PID/status (VmRSS, VmHWM, ...) in KiB; None once the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


class RssSampler:
    """Samples a process's VmRSS every `interval` s on a thread, between start() and stop();
    `peak_kib` is the largest sample. (VmHWM is the lifetime peak; this is the peak of one
    measurement window.)"""

    def __init__(self, pid: int, interval: float = 0.05):
        self.pid, self.interval, self.peak_kib = pid, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_kib = max(self.peak_kib, proc_status_kib(self.pid, "VmRSS") or 0)
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def machine() -> dict:
    """The CPU model, the vector extensions it has (of CPU_FLAGS), its core count and the load."""
    model, flags = "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    return {
        "cpu": model,
        "flags": [f for f in CPU_FLAGS if f in flags],
        "cores": os.cpu_count(),
        "load_average": os.getloadavg(),
    }


# ── streaming clients ──


async def stream_one(client: httpx.AsyncClient, url: str, headers: dict, body: dict) -> dict:
    sent = time.perf_counter()
    first = last = None
    usage_tokens = text_chunks = 0
    async with client.stream("POST", url, json=body, headers=headers) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code} from {url}: {(await r.aread())[:500]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"stream error from {url}: {chunk['error']}")
            if any(c.get("text") for c in chunk.get("choices", [])):
                last = time.perf_counter()
                first = first or last
                text_chunks += 1
            usage_tokens = (chunk.get("usage") or {}).get("completion_tokens", usage_tokens)
    tokens = usage_tokens or text_chunks
    if tokens != body["max_tokens"] or first is None:
        raise RuntimeError(f"{url} streamed {tokens} tokens, asked for {body['max_tokens']}")
    return {"ttft": first - sent, "itl": (last - first) / max(1, tokens - 1), "tokens": tokens,
            "end": last}  # fmt: skip


async def run_clients(url: str, headers: dict, n_clients: int, requests: list[dict]) -> dict:
    """n_clients streams; client i sends its share of `requests` one after the other."""
    per = len(requests) // n_clients
    out: list[dict] = []

    async def client(mine):
        # a connection per request: llama-server closes idle keep-alive connections, and a
        # request sent on one as it closes fails ("Server disconnected without a response")
        for body in mine:
            async with httpx.AsyncClient(timeout=600) as c:
                out.append(await stream_one(c, url, headers, body))

    start = time.perf_counter()
    await asyncio.gather(*(client(requests[i * per : (i + 1) * per]) for i in range(n_clients)))
    makespan = max(o["end"] for o in out) - start
    tokens = sum(o["tokens"] for o in out)
    return {
        "requests": len(out),
        "tokens": tokens,
        "makespan_s": makespan,
        "tokens_per_s": tokens / makespan,
        "ttft_ms": 1e3 * statistics.median(o["ttft"] for o in out),
        "itl_ms": 1e3 * statistics.median(o["itl"] for o in out),
    }
