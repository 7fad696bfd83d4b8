"""The registry's key layout, the same on a folder and under an S3 prefix:

config/gates.json                            promotion policy (registry/gates.py)
blobs/sha256/<hex>                           file bytes, stored once whatever the version
models/<name>/versions/<000042>/manifest.json  the package's manifest.json, byte for byte;
                                             created only if absent: this is the version
models/<name>/versions/<000042>/reports/<kind>.json  a report attached after the push (eval,
                                             load_test, canary, ...): compare-and-swap only
models/<name>/aliases/<alias>.json           {version, seq, history}: compare-and-swap only
models/<name>/events/<time_ns>-<id>.json     one create-only object per change: the audit log
models/<name>/uploads/<id>.json              a push in progress: the blobs it relies on
"""

from __future__ import annotations

from registry.manifest import MANIFEST

GATES_KEY = "config/gates.json"


def blob_key(sha256: str) -> str:
    return f"blobs/sha256/{sha256}"


def version_key(name: str, version: int) -> str:
    return f"models/{name}/versions/{version:06d}/{MANIFEST}"


def alias_key(name: str, alias: str) -> str:
    return f"models/{name}/aliases/{alias}.json"


def reports_prefix(name: str, version: int) -> str:
    return f"models/{name}/versions/{version:06d}/reports/"


def report_key(name: str, version: int, kind: str) -> str:
    return f"{reports_prefix(name, version)}{kind}.json"
