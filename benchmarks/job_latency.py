"""Job submission → first training step, on the embedded default: `aimass serve` (SQLite under a
fresh $AIMASS_HOME, one worker child), driven with the official openai client.

    .venv/bin/python benchmarks/job_latency.py [--jobs 5] [--chars 60000]

One upload, then `--jobs` jobs one after another (model "tiny", 1 epoch). For each: the seconds
from jobs.create returning to the first metric point (step 1) appearing in list_events (polled
every 20 ms), and to the job's end. The first step waits for: the worker's next poll of the queue
(1 s period), the training file's copy, the tokenizer trained on the corpus and the tokenization
(prepare_run, as `aimass train --preset` does), building the model and its first step.
Prints each job's figures and the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import openai

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import free_port, machine, stop, wait_http  # noqa: E402

DEMO = Path(__file__).resolve().parent.parent / "data" / "demo" / "python-docstrings.txt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=5)
    parser.add_argument("--chars", type=int, default=60_000, help="corpus size in characters")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        corpus = Path(tmp) / "corpus.jsonl"
        text = DEMO.read_text(encoding="utf-8")[: args.chars]
        lines = [json.dumps({"text": p}) for p in text.split("\n\n") if p.strip()]
        corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
        port = free_port()
        env = {
            k: v for k, v in os.environ.items() if k not in ("AIMASS_DATABASE", "AIMASS_REGISTRY")
        }
        env["AIMASS_HOME"] = str(home)
        with open(Path(tmp) / "serve.log", "wb") as log:
            server = subprocess.Popen(
                [sys.executable, "-m", "aimass_cli", "serve", "--port", str(port)],
                env=env, stdout=subprocess.DEVNULL, stderr=log,
            )  # fmt: skip
            try:
                wait_http(f"http://127.0.0.1:{port}/healthz", server)
                rounds = measure(f"http://127.0.0.1:{port}/v1", corpus, args.jobs)
            finally:
                stop(server)
    first = [r[0] for r in rounds]
    done = [r[1] for r in rounds]
    print(json.dumps({"machine": machine(), "corpus_bytes": corpus_size(args.chars)}))
    for i, (a, b) in enumerate(rounds, 1):
        print(f"job {i}: first step after {a:.2f} s, succeeded after {b:.2f} s")
    print(f"median: first step {statistics.median(first):.2f} s "
          f"(min {min(first):.2f}, max {max(first):.2f}); "
          f"job end {statistics.median(done):.2f} s")  # fmt: skip


def corpus_size(chars: int) -> int:
    return len(DEMO.read_text(encoding="utf-8")[:chars].encode())


def measure(base_url: str, corpus: Path, n: int) -> list[tuple[float, float]]:
    client = openai.OpenAI(base_url=base_url, api_key="none", timeout=60, max_retries=0)
    with open(corpus, "rb") as f:
        file_id = client.files.create(file=f, purpose="fine-tune").id
    rounds = []
    for _ in range(n):
        job = client.fine_tuning.jobs.create(model="tiny", training_file=file_id,
                                             hyperparameters={"n_epochs": 1})  # fmt: skip
        submitted = time.perf_counter()
        first = None
        while True:
            if first is None:
                events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
                if any(e.type == "metrics" for e in events):
                    first = time.perf_counter() - submitted
            status = client.fine_tuning.jobs.retrieve(job.id).status
            if status in ("succeeded", "failed", "cancelled"):
                if status != "succeeded":
                    raise RuntimeError(f"job {job.id} {status}")
                break
            time.sleep(0.02)
        rounds.append((first, time.perf_counter() - submitted))
    return rounds


if __name__ == "__main__":
    main()
