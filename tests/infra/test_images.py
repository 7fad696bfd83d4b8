"""infra/docker, checked without a Docker daemon: the Dockerfiles are multi-stage, run as a
non-root user, declare a health check, copy only files that exist and that .dockerignore keeps,
and copy every package pyproject.toml installs. Their two scripts (health check, first admin)
run here for real."""

from __future__ import annotations

import fnmatch
import http.server
import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import threading
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "infra" / "docker"
DOCKERFILES = ("Dockerfile", "Dockerfile.cuda")


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    lines = [ln for ln in path.read_text().splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def stages(path: Path) -> list[list[tuple[str, str]]]:
    """The instructions of each stage (each starts at its FROM)."""
    out: list[list[tuple[str, str]]] = []
    for instruction in instructions(path):
        if instruction[0] == "FROM":
            out.append([])
        if out:
            out[-1].append(instruction)
    return out


def ignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]
    # the matcher below does not implement exceptions; keep the file without them
    assert not any(p.startswith("!") for p in patterns)
    return patterns


def ignored(relative: str, patterns: list[str]) -> bool:
    """Docker's rule: a path is excluded when a pattern matches it or a folder above it."""
    parts = relative.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        if pattern.startswith("**/"):
            if any(fnmatch.fnmatchcase(part, pattern[3:]) for part in parts):
                return True
        elif any(fnmatch.fnmatchcase(prefix, pattern) for prefix in prefixes):
            return True
    return False


def test_ignore_matcher():
    patterns = [".git", "**/__pycache__", "*.egg-info", "infra/k8s"]
    assert ignored("engine/__pycache__/x.pyc", patterns)
    assert ignored("aimass.egg-info/PKG-INFO", patterns)
    assert ignored("infra/k8s/base/gateway.yaml", patterns)
    assert not ignored("infra/docker/healthcheck.py", patterns)
    assert not ignored("engine/core.py", patterns)


def _copies(stage: list[tuple[str, str]]) -> list[list[str]]:
    """The source paths of each COPY from the build context (not --from another stage)."""
    out = []
    for word, args in stage:
        if word == "COPY" and "--from=" not in args:
            out.append(args.split()[:-1])
    return out


@pytest.mark.parametrize("name", DOCKERFILES)
def test_multi_stage_non_root_with_health_check(name):
    path = DOCKER / name
    all_stages = stages(path)
    assert len(all_stages) >= 2, f"{name}: not multi-stage"
    build_names = {s[0][1].split()[-1] for s in all_stages[:-1] if " AS " in s[0][1].upper()}
    runtime = all_stages[-1]
    copied_from = [a for w, a in runtime if w == "COPY" and "--from=" in a]
    assert any(a.split()[0].removeprefix("--from=") in build_names for a in copied_from), (
        f"{name}: the runtime stage copies nothing from a build stage"
    )
    users = [a for w, a in runtime if w == "USER"]
    assert users, f"{name}: the runtime stage sets no USER (it would run as root)"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0") and (not user.isdigit() or int(user) >= 1000), user
    checks = [a for w, a in runtime if w == "HEALTHCHECK"]
    assert checks and "NONE" not in checks[-1].upper(), f"{name}: no HEALTHCHECK"
    # the health check probes the port the default command serves
    cmd = json.loads(next(a for w, a in runtime if w == "CMD"))
    port = cmd[cmd.index("--port") + 1]
    assert f"127.0.0.1:{port}/healthz" in checks[-1]
    assert json.loads(next(a for w, a in runtime if w == "ENTRYPOINT")) == ["aimass"]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_every_copied_file_exists_and_is_in_the_build_context(name):
    patterns = ignore_patterns()
    for stage in stages(DOCKER / name):
        for sources in _copies(stage):
            for source in sources:
                path = ROOT / source
                assert path.exists(), f"{name}: COPY {source}: no such file in the repository"
                files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
                kept = [p for p in files if not ignored(str(p.relative_to(ROOT)), patterns)]
                assert kept, f"{name}: COPY {source}: excluded by .dockerignore"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_the_build_stage_copies_every_installed_package(name):
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = [p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]]
    modules = project["tool"]["setuptools"]["py-modules"]
    copied = {s.rstrip("/") for sources in _copies(stages(DOCKER / name)[0]) for s in sources}
    needed = {*packages, *(f"{m}.py" for m in modules), "pyproject.toml", "README.md"}
    assert needed <= copied, f"{name} does not copy {sorted(needed - copied)}"


def test_cpu_image_pins_torch_as_the_makefile_does():
    pin = re.search(r"^TORCH\s*\?=\s*(\S+)", (ROOT / "Makefile").read_text(), re.M).group(1)
    for name in DOCKERFILES:
        args = [a for w, a in instructions(DOCKER / name) if w == "ARG"]
        assert f"TORCH={pin}" in args, name
    cpu = dict(
        a.split("=", 1) for w, a in instructions(DOCKER / "Dockerfile") if w == "ARG" and "=" in a
    )
    assert cpu["TORCH_INDEX"] == "https://download.pytorch.org/whl/cpu"
    cuda_from = next(
        a
        for w, a in instructions(DOCKER / "Dockerfile.cuda")
        if w == "ARG" and a.startswith("CUDA_IMAGE=")
    )
    assert cuda_from.startswith("CUDA_IMAGE=nvidia/cuda:") and "cudnn-runtime" in cuda_from


# ── the scripts the images ship ──


def _healthcheck():
    spec = importlib.util.spec_from_file_location("healthcheck", DOCKER / "healthcheck.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (the standard library's name)
        self.send_response(200 if self.path == "/healthz" else 503)
        self.end_headers()

    def log_message(self, *args):
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_healthcheck_http_and_tcp():
    check = _healthcheck().check
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:
        assert check(f"http://127.0.0.1:{port}/healthz") is None
        assert "HTTP 503" in check(f"http://127.0.0.1:{port}/readyz")
        assert check(f"tcp://127.0.0.1:{port}") is None
        closed = _free_port()
        assert check(f"tcp://127.0.0.1:{closed}") is not None
        assert check(f"http://127.0.0.1:{closed}/healthz") is not None
        assert "scheme" in check("ftp://127.0.0.1:21")
        done = subprocess.run([sys.executable, str(DOCKER / "healthcheck.py"),
                               f"http://127.0.0.1:{port}/healthz"], timeout=30)  # fmt: skip
        assert done.returncode == 0
        done = subprocess.run([sys.executable, str(DOCKER / "healthcheck.py"),
                               f"tcp://127.0.0.1:{closed}"], capture_output=True, timeout=30)  # fmt: skip
        assert done.returncode == 1
    finally:
        server.shutdown()


def test_bootstrap_admin_creates_the_admin_once(tmp_path):
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "AIMASS_HOME": str(tmp_path / "home"),
        "AIMASS_DATABASE": f"sqlite:///{tmp_path / 'aimass.db'}",
        "ADMIN_EMAIL": "ops@example.com",
        "ADMIN_PASSWORD": "a long enough password",
    }
    script = str(DOCKER / "bootstrap-admin.sh")
    first = subprocess.run(["sh", script], env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    again = subprocess.run(["sh", script], env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert "exists already" in again.stdout
    listed = subprocess.run([sys.executable, "-m", "aimass_cli", "users", "list", "--json"],
                            env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
    users = json.loads(listed.stdout)
    assert [(u["email"], u["is_admin"]) for u in users] == [("ops@example.com", True)]
    missing = subprocess.run(["sh", script], env={**env, "ADMIN_PASSWORD": ""},
                             capture_output=True, text=True, timeout=60)  # fmt: skip
    assert missing.returncode != 0 and "ADMIN_PASSWORD" in missing.stderr
