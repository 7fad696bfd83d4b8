"""Two `aimass serve` processes on one PostgreSQL, as several replicas behind a load balancer run:
a key created through one works on the other, its revocation reaches both (the other within its
5 s key cache), usage from both sums in one report, and a fine-tuning job submitted to the replica
that runs no worker is run by the other's worker, its model then served by both."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from controlplane import identity
from controlplane.access import CLI
from controlplane.db import Database
from controlplane.keys import create_key
from tests.conftest import DEMO_CORPUS
from tests.controlplane.conftest import postgres_url  # noqa: F401 (a fixture)
from tests.gateway.conftest import free_port

pytestmark = pytest.mark.slow

KEY_CACHE_S = 5.0  # the stated bound for a revocation to reach another replica


@contextlib.contextmanager
def serve(tmp_path: Path, name: str, database: str, registry: Path, workers: int):
    """`aimass serve` in a process of its own; yields its base URL, stops it with SIGTERM."""
    port = free_port()
    env = os.environ | {"AIMASS_HOME": str(tmp_path / "home")}  # one machine: files shared
    log = tmp_path / f"{name}.log"  # a file, not a pipe: a full pipe would stall the server
    command = [sys.executable, "-m", "aimass_cli", "serve", "--port", str(port),
               "--database", database, "--registry", str(registry), "--workers", str(workers),
               "--slots", "2", "--threads", "1", "--host", "127.0.0.1"]  # fmt: skip
    with open(log, "wb") as err:
        server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=err)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert server.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"{name} did not start"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            time.sleep(0.2)
        yield base
    finally:
        workers = _children(server.pid)
        server.terminate()
        # uvicorn re-raises the SIGTERM it handled once the app has shut down cleanly
        assert server.wait(90) in (0, -signal.SIGTERM), log.read_text()[-3000:]
        for pid in workers:  # its worker children stopped with it
            assert not _alive(pid), f"{name}'s worker {pid} outlived it"


def _alive(pid: int) -> bool:
    """Running, or stopped but not yet dead (a zombie whose parent has gone is dead)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def complete(base: str, key: str, model: str = "tiny") -> dict:
    r = httpx.post(f"{base}/v1/completions", timeout=60,
                   headers={"Authorization": f"Bearer {key}"},
                   json={"model": model, "prompt": "Return the", "max_tokens": 5})  # fmt: skip
    assert r.status_code == 200, r.text
    return r.json()["usage"]


def test_two_gateway_processes_share_one_truth(
    tmp_path,
    tiny_registry,
    postgres_url,  # noqa: F811
):
    db = Database.open(postgres_url)
    db.upgrade()
    with db.session() as s:
        project = identity.create_project(s, CLI, "shared").id
        _, admin = create_key(s, CLI, project, ["admin", "inference", "train"], role="owner")
    db.close()
    auth = {"Authorization": f"Bearer {admin}"}
    corpus = tmp_path / "corpus.jsonl"
    paragraphs = DEMO_CORPUS.read_text(encoding="utf-8")[:20_000].split("\n\n")
    corpus.write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs if p.strip()))

    with (
        serve(tmp_path, "a", postgres_url, tiny_registry, workers=0) as a,
        serve(tmp_path, "b", postgres_url, tiny_registry, workers=1) as b,
    ):
        # a key created through A works on B; revoked through A, B refuses it within its cache
        r = httpx.post(f"{a}/v1/projects/{project}/api_keys", headers=auth,
                       json={"scopes": ["inference"], "name": "app"})  # fmt: skip
        assert r.status_code == 201, r.text
        key_id, key = r.json()["id"], r.json()["key"]
        used = [complete(a, key), complete(b, key), complete(b, key)]

        r = httpx.delete(f"{a}/v1/projects/{project}/api_keys/{key_id}", headers=auth)
        assert r.status_code == 200, r.text
        revoked_at = time.monotonic()
        bearer = {"Authorization": f"Bearer {key}"}
        assert httpx.get(f"{a}/v1/models", headers=bearer).status_code == 401  # at once
        while httpx.get(f"{b}/v1/models", headers=bearer).status_code != 401:
            assert time.monotonic() - revoked_at < KEY_CACHE_S + 2, "B still accepts the key"
            time.sleep(0.2)

        # a job submitted to A (no worker) is run by B's worker
        with open(corpus, "rb") as f:
            r = httpx.post(f"{a}/v1/files", headers=auth, data={"purpose": "fine-tune"},
                           files={"file": ("corpus.jsonl", f)})  # fmt: skip
        assert r.status_code == 200, r.text
        job = {"model": "tiny", "training_file": r.json()["id"], "suffix": "replicated",
               "hyperparameters": {"max_steps": 3, "batch_size": 4, "block_size": 32}}  # fmt: skip
        r = httpx.post(f"{a}/v1/fine_tuning/jobs", headers=auth, json=job)
        assert r.status_code == 200, r.text
        job_id = r.json()["id"]
        deadline = time.monotonic() + 300
        while (done := httpx.get(f"{a}/v1/fine_tuning/jobs/{job_id}", headers=auth).json())[
            "status"
        ] not in ("succeeded", "failed", "cancelled"):
            assert time.monotonic() < deadline, f"job still {done['status']}"
            time.sleep(0.5)
        assert done["status"] == "succeeded", done["error"]
        for base in (a, b):  # served at once, by either replica
            used.append(complete(base, admin, done["fine_tuned_model"]))

    # both stopped cleanly, so each flushed its usage; the report sums both replicas
    db = Database.open(postgres_url)
    with db.session() as s:
        from controlplane.models import Job  # noqa: PLC0415

        assert s.get(Job, job_id).worker_id  # B's worker child: A runs none
    db.close()
    with serve(tmp_path, "c", postgres_url, tiny_registry, workers=0) as c:
        r = httpx.get(f"{c}/v1/usage", headers=auth, params={"project_id": project,
                                                              "group_by": "day"})  # fmt: skip
        assert r.status_code == 200, r.text
        buckets = r.json()["data"]
    totals = {k: sum(b[k] for b in buckets) for k in ("requests", "prompt_tokens",
                                                      "completion_tokens")}  # fmt: skip
    assert totals == {
        "requests": len(used),
        "prompt_tokens": sum(u["prompt_tokens"] for u in used),
        "completion_tokens": sum(u["completion_tokens"] for u in used),
    }
