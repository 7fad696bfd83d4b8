"""Settings every package resolves the same way.

Read when asked, never at import: a process (or a test) that sets AIMASS_HOME after importing
the project is honoured.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path


def aimass_home(environ: Mapping[str, str] | None = None) -> Path:
    """AIMASS_HOME, or ~/.aimass when it is unset or empty: the embedded default's registry
    folder, cache, API-key database and bundled models live under it. `environ` defaults to
    the process environment, read at this call."""
    env = os.environ if environ is None else environ
    return Path(env.get("AIMASS_HOME") or Path.home() / ".aimass")


def default_registry(environ: Mapping[str, str] | None = None) -> str:
    """The registry a command uses when not given one: AIMASS_REGISTRY (a folder, file:// or
    s3:// URI), else the folder AIMASS_HOME/registry."""
    env = os.environ if environ is None else environ
    return env.get("AIMASS_REGISTRY") or str(aimass_home(env) / "registry")


def default_database(environ: Mapping[str, str] | None = None) -> str:
    """The control-plane database a command uses when not given one: AIMASS_DATABASE (a
    sqlite:/// or postgresql:// URL), else the SQLite file AIMASS_HOME/aimass.db."""
    env = os.environ if environ is None else environ
    return env.get("AIMASS_DATABASE") or f"sqlite:///{aimass_home(env) / 'aimass.db'}"
