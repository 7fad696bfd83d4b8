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
from argon2 import PasswordHasher

from controlplane import identity
from controlplane.access import CLI
from controlplane.db import Database
from tests.gateway.conftest import free_port, tiny_registry  # noqa: F401  (a shared fixture)

CHROMIUM = (
    os.environ.get("AIMASS_CHROMIUM")
    or shutil.which("chromium")
    or shutil.which("chromium-browser")
)
WIDTHS = {"desktop": (1280, 900), "phone": (390, 844)}
PASSWORD = "correct horse battery"  # every person the browser tests make signs in with it


@pytest.fixture(scope="module")
def chromium():
    """A headless Debian Chromium under Playwright, or a skip that says what is missing. Per
    module: Playwright's sync API keeps an asyncio loop running in this thread while it is
    open, and every later test that calls asyncio.run() would fail."""
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


def open_page(browser, *, width: int = 1280, url: str | None = None, email: str | None = None,
              timeout_ms: int = 15_000):  # fmt: skip
    """A page in a fresh browser context (its own cookies), signed in as `email` through the API
    when given, that records script errors and Content-Security-Policy violations in
    `page.problems`. An API's 4xx is logged by the browser as a failed resource: expected where
    a test provokes one, so those are not problems."""
    context = browser.new_context(viewport={"width": width, "height": 900})
    if email is not None:
        signed = context.request.post(f"{url}/v1/auth/login",
                                      data={"email": email, "password": PASSWORD})  # fmt: skip
        assert signed.ok, signed.text()
    page = context.new_page()
    page.set_default_timeout(timeout_ms)
    page.problems = []
    page.on("pageerror", lambda e: page.problems.append(f"script error: {e}"))
    page.on("console", lambda m: m.type == "error" and "Failed to load resource" not in m.text
            and page.problems.append(f"console: {m.text}"))  # fmt: skip
    return page


@pytest.fixture
def page(chromium):
    """A page at desktop width, signed in as nobody."""
    page = open_page(chromium)
    yield page
    page.context.close()


@pytest.fixture
def cheap_hashing(monkeypatch):
    """argon2 at its cheapest: these tests are not about hashing, and sign in often."""
    monkeypatch.setattr(identity, "_HASHER", PasswordHasher(time_cost=1, memory_cost=64,
                                                            parallelism=1))  # fmt: skip


def add_people(database: str, *people: tuple[str, str, bool]) -> None:
    """(email, display name, is platform admin) people in the database at `database` (migrated
    first), each with PASSWORD."""
    db = Database.open(database)
    try:
        db.upgrade()
        with db.session() as s:
            for email, name, admin in people:
                identity.create_user(s, CLI, email, name, PASSWORD, is_admin=admin)
    finally:
        db.close()


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
