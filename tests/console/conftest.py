"""Console tests: a gateway over the tiny registry (tests/gateway/conftest.py's), and for the
browser tests Debian's Chromium driven by Playwright (never a downloaded browser)."""

from __future__ import annotations

from tests.gateway.conftest import tiny_registry  # noqa: F401  (a fixture shared with the gateway tests)
