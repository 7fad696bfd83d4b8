"""Console tests: a gateway over the tiny registry (tests/gateway/conftest.py's), and for the
browser tests Debian's Chromium driven by Playwright's Python package through
`executable_path` (a browser is never downloaded; `make test` installs Debian's where it can)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.gateway.conftest import free_port, tiny_registry  # noqa: F401  (a shared fixture)

CHROMIUM = (
    os.environ.get("AIMASS_CHROMIUM")
    or shutil.which("chromium")
    or shutil.which("chromium-browser")
)
WIDTHS = {"desktop": (1280, 900), "phone": (390, 844)}


@pytest.fixture(scope="session")
def chromium():
    """A headless Debian Chromium under Playwright, or a skip that says what is missing."""
    if CHROMIUM is None:
        pytest.skip(
            "no Chromium: the browser tests need Debian's `chromium` package (`make test` "
            "installs it with apt-get when run as root; else `apt-get install chromium`)"
        )
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="Playwright's Python package is not installed (make venv)"
    )
    with sync_api.sync_playwright() as p:
        # --no-sandbox: tests run as root in containers, where Chromium's sandbox cannot start
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


@dataclass
class Platform:
    url: str
    home: Path
    log: Path

    def tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:]


@contextlib.contextmanager
def aimass_serve(home: Path, *args: str):
    """`aimass serve` as `make run` starts it (SQLite and the registry under AIMASS_HOME, one
    training worker child), on a free loopback port."""
    port = free_port()
    env = os.environ | {"AIMASS_HOME": str(home), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("AIMASS_DATABASE", None)
    env.pop("AIMASS_REGISTRY", None)
    home.mkdir(parents=True, exist_ok=True)
    log = home / "serve.log"  # a file, not a pipe: a full pipe would stall the server
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "aimass_cli", "serve", "--port", str(port), "--slots", "4",
             "--threads", "1", *args],
            env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    platform = Platform(f"http://127.0.0.1:{port}", home, log)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert server.poll() is None, platform.tail()
            assert time.monotonic() < deadline, "aimass serve did not answer in 90 s"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{platform.url}/healthz", timeout=2).status_code == 200:
                    break
            time.sleep(0.2)
        yield platform
    finally:
        server.terminate()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
