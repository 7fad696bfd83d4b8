"""Registry push/pull throughput against a plain copy of the same bytes, in the same run.

A package of random bytes (default 500 MB in 2 files) goes through:
    S3 (moto's server in a child process, over HTTP on localhost)
        baseline  boto3 `upload_file` / `download_file` of the same files (s3transfer: 8 MB
                  parts, 10 threads), no hashing
        registry  `push` (sha256 checked while reading, parts uploaded in parallel, create-only
                  completion, manifest written last) and a cold `pull` (ranged GETs in parallel,
                  hashed in order, renamed into the cache only when verified): the time from
                  nothing cached to a verified package folder
    local folder
        baseline  `shutil.copyfile` in (then fsync, as the registry does), and out again
                  (in-kernel copies: no bytes pass through Python; plain copy-in also shown)
        registry  `push` into a folder (hashed, fsync'd, published by link) and a cold `pull`

Each round runs baseline and registry from an empty bucket, the first side alternating\n(AB, BA, ...); the median of --repeat rounds is kept.
Overhead = registry time / baseline time - 1 (the target for hashing + verification: < 20%).

    python benchmarks/registry.py                    # 500 MB, 3 repeats: ~3 minutes
    python benchmarks/registry.py --size-mb 50 --repeat 1
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from datetime import UTC, datetime
from pathlib import Path

# this file is named registry.py: its folder must not shadow the registry package
HERE = Path(__file__).resolve().parent
sys.path[:] = [str(HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != HERE]

BUCKET = "aimass-bench"


def make_package(root: Path, size_mb: int, files: int) -> int:
    """A package whose artifact is `files` files of random bytes totalling `size_mb` MB."""
    from registry.manifest import (
        Artifact,
        Manifest,
        ModelSpec,
        TokenizerSpec,
        encode,
        file_entry,
    )

    (root / "onnx-fp32").mkdir(parents=True)
    (root / "tokenizer.json").write_text("{}")
    names = ["onnx-fp32/model.onnx"] + [f"onnx-fp32/model.onnx.data{i}" for i in range(1, files)]
    total = size_mb * 1_000_000
    for i, name in enumerate(names):
        left = total // files + (total % files if i == 0 else 0)
        with open(root / name, "wb") as f:
            while left:
                n = min(left, 64 << 20)
                f.write(os.urandom(n))
                left -= n
    spec = ModelSpec(
        architecture="llama",
        vocab_size=300,
        dim=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=8,
        ffn_dim=64,
        rope_theta=1e4,
        norm_eps=1e-5,
        tie_embeddings=True,
    )
    manifest = Manifest(
        model=spec,
        max_context=64,
        tokenizer=TokenizerSpec(
            files=[file_entry(root, "tokenizer.json")], eos_token="x", eos_id=0
        ),
        created_at=datetime.now(UTC),
        artifacts=[
            Artifact(
                target="onnx-fp32",
                flavour="ort",
                runtime="onnxruntime",
                dtype="float32",
                entry=names[0],
                files=[file_entry(root, n) for n in names],
                max_len=64,
            )
        ],
    )
    (root / "manifest.json").write_bytes(encode(manifest))
    return total


def start_moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=1)
            return proc, url
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto server did not start")


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def artifact_files(pkg: Path) -> list[Path]:
    return sorted(p for p in (pkg / "onnx-fp32").iterdir())


def empty_bucket(client) -> None:
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        for o in page.get("Contents", []):
            client.delete_object(Bucket=BUCKET, Key=o["Key"])


def bench_s3(pkg: Path, work: Path, client, store_client, registry_first: bool) -> dict[str, float]:
    """One round; each side starts from an empty bucket, and the side going first alternates
    between rounds (the server slows as it holds more, and after a large download)."""
    from registry.cache import pull
    from registry.registry import Registry
    from registry.s3 import S3Store

    times = {}

    def baseline() -> None:
        keys = [f"baseline/{p.name}" for p in artifact_files(pkg)]
        times["baseline push"] = timed(
            lambda: [
                client.upload_file(str(p), BUCKET, k)
                for p, k in zip(artifact_files(pkg), keys, strict=True)
            ]
        )
        down = work / "down"
        down.mkdir()
        times["baseline pull"] = timed(
            lambda: [client.download_file(BUCKET, k, str(down / Path(k).name)) for k in keys]
        )
        shutil.rmtree(down)
        empty_bucket(client)

    def registry() -> None:
        reg = Registry(S3Store(BUCKET, "reg", client=store_client))
        times["registry push"] = timed(lambda: reg.push(pkg, "bench"))
        times["registry pull"] = timed(lambda: pull(reg, "bench:1", cache_dir=work / "cache"))
        # the same ranged GETs as download_file (8 MiB): moto reads the whole object for each
        # range, so the number of requests dominates; this isolates the verification cost
        same = Registry(S3Store(BUCKET, "reg", client=store_client, range_size=8 << 20))
        times["registry pull 8MiB"] = timed(lambda: pull(same, "bench:1", cache_dir=work / "c8"))
        shutil.rmtree(work / "cache")
        shutil.rmtree(work / "c8")
        empty_bucket(client)

    for side in (registry, baseline) if registry_first else (baseline, registry):
        side()
    return times


def copy_durable(src: Path, folder: Path) -> None:
    """A copy that survives a crash, as the registry's: the file and its folder fsync'd."""
    dst = folder / src.name
    shutil.copyfile(src, dst)
    fd = os.open(dst, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    fd = os.open(folder, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def bench_local(pkg: Path, work: Path) -> dict[str, float]:
    from registry.backends import LocalStore
    from registry.cache import pull
    from registry.registry import Registry

    tag = uuid.uuid4().hex[:8]
    times = {}
    copy_in, copy_out = work / f"copy-in-{tag}", work / f"copy-out-{tag}"
    copy_in.mkdir()
    copy_out.mkdir()
    times["copy push"] = timed(
        lambda: [shutil.copyfile(p, copy_in / p.name) for p in artifact_files(pkg)]
    )
    for p in copy_in.iterdir():
        p.unlink()
    times["baseline push"] = timed(lambda: [copy_durable(p, copy_in) for p in artifact_files(pkg)])
    times["baseline pull"] = timed(
        lambda: [shutil.copyfile(p, copy_out / p.name) for p in sorted(copy_in.iterdir())]
    )
    reg = Registry(LocalStore(work / f"reg-{tag}"))
    times["registry push"] = timed(lambda: reg.push(pkg, "bench"))
    times["registry pull"] = timed(lambda: pull(reg, "bench:1", cache_dir=work / f"cache-{tag}"))
    for d in (copy_in, copy_out, work / f"reg-{tag}", work / f"cache-{tag}"):
        shutil.rmtree(d)
    return times


def report(backend: str, runs: list[dict[str, float]], size: int) -> None:
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    for op in ("push", "pull"):
        b, r = med[f"baseline {op}"], med[f"registry {op}"]
        print(
            f"{backend:<6} {op:<5} baseline {size / b / 1e6:7.1f} MB/s ({b:5.2f} s)   "
            f"registry {size / r / 1e6:7.1f} MB/s ({r:5.2f} s)   overhead {r / b - 1:+6.1%}"
        )
    if "registry pull 8MiB" in med:
        b, r = med["baseline pull"], med["registry pull 8MiB"]
        print(
            f"{backend:<6} pull  with 8 MiB ranges like download_file: registry "
            f"{size / r / 1e6:7.1f} MB/s ({r:5.2f} s)   overhead {r / b - 1:+6.1%}"
        )
    if "copy push" in med:
        c = med["copy push"]
        print(f"{backend:<6} push  (copy without fsync: {size / c / 1e6:.1f} MB/s, {c:.2f} s)")
    print(f"{backend:<6} cold pull -> verified in cache: {med['registry pull']:.2f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=500)
    ap.add_argument("--files", type=int, default=2, help="files the package's bytes are split in")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--backends", default="s3,local")
    ap.add_argument("--workdir", help="scratch folder (default: a temporary one)")
    args = ap.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f} (1 min), {os.cpu_count()} CPUs")

    work = Path(tempfile.mkdtemp(prefix="aimass-bench-", dir=args.workdir))
    proc = None
    try:
        pkg = work / "pkg"
        size = make_package(pkg, args.size_mb, args.files)
        print(f"package: {size / 1e6:.0f} MB in {args.files} files + manifest and tokenizer")
        backends = args.backends.split(",")
        if "s3" in backends:
            import boto3

            proc, url = start_moto()
            os.environ.update(
                AWS_ACCESS_KEY_ID="bench",
                AWS_SECRET_ACCESS_KEY="bench",
                AWS_DEFAULT_REGION="us-east-1",
                AWS_ENDPOINT_URL=url,
            )
            from registry.s3 import S3Store

            client = boto3.client("s3")  # the baseline's, as boto3 users make it
            client.create_bucket(Bucket=BUCKET)
            store_client = S3Store(BUCKET).client  # the registry's (a bigger connection pool)
            for c in (client, store_client):  # both warm: no first-call setup in the timings
                c.list_objects_v2(Bucket=BUCKET)
            runs = [
                bench_s3(pkg, work, client, store_client, i % 2 == 1) for i in range(args.repeat)
            ]
            report("s3", runs, size)
        if "local" in backends:
            report("local", [bench_local(pkg, work) for _ in range(args.repeat)], size)
    finally:
        if proc:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(work, ignore_errors=True)
    print(f"load average after: {os.getloadavg()[0]:.2f} (1 min)")


if __name__ == "__main__":
    main()
