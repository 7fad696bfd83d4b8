"""Garbage collection: versions nobody can reach, then the blobs only they used.

A version is kept while it is younger than the retention, or an alias points to it or holds it
in its history (the up to HISTORY_KEEP earlier targets rollback can return to); its attached
reports stay and go with it. A blob is kept while a
remaining version lists it, a push in progress names it (models/*/uploads/), or it is younger
than the retention (a push may be uploading it). What interrupted pushes left (upload records,
temporary files, S3 multipart uploads) and reports a version lost while they were being attached
go once past the retention.

Races with a concurrent promote or push are narrowed, not excluded by a lock: aliases are read
again just before each version is deleted, blobs are listed before the versions that reference
them, and a push checks its blobs again once its version is written (re-uploading any gc took).
"""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import msgspec

from registry.errors import NotFound
from registry.layout import reports_prefix, version_key
from registry.manifest import MANIFEST, decode
from registry.records import GcReport

if TYPE_CHECKING:  # the Registry calls collect(); importing it back would be a cycle
    from registry.registry import Registry


def collect(
    reg: Registry, older_than: timedelta, *, dry_run: bool = False, now: datetime | None = None
) -> GcReport:
    cutoff = (now or datetime.now(UTC)) - older_than
    report, doomed = GcReport(), set()
    blobs = list(reg.store.list("blobs/sha256/"))  # listed first: later uploads are kept
    for name in reg.models():
        for v in reg.versions(name):
            if v.pushed_at >= cutoff or v.version in _protected(reg, name):
                continue  # aliases are read again per version: they may move meanwhile
            report.versions.append(f"{name}:{v.version}")
            doomed.add(version_key(name, v.version))
            if not dry_run:
                reg.store.delete(version_key(name, v.version))  # first: the version is gone
                for info in reg.store.list(reports_prefix(name, v.version)):
                    reg.store.delete(info.key)
                reg._event("gc", name, version=v.version, detail="unaliased, past retention")
        report.other += _orphan_reports(reg, name, cutoff, dry_run)
    referenced = _referenced(reg, cutoff, doomed, dry_run, report)
    for info in blobs:
        sha = info.key.rsplit("/", 1)[-1]
        if sha not in referenced and info.modified < cutoff:
            report.blobs.append(sha)
            if not dry_run:
                reg.store.delete(info.key)
    if not dry_run:
        report.other += reg.store.cleanup(cutoff)
    return report


def _orphan_reports(reg: Registry, name: str, cutoff: datetime, dry_run: bool) -> list[str]:
    """Reports under a version folder with no manifest, older than the cutoff: attached while
    a gc deleted their version (attach_report removes its own; a crash in between may not)."""
    prefix, found = f"models/{name}/versions/", []
    infos = list(reg.store.list(prefix))
    live = {i.key[len(prefix) :].split("/")[0] for i in infos if i.key.endswith(f"/{MANIFEST}")}
    for info in infos:
        parts = info.key[len(prefix) :].split("/")
        orphan = len(parts) == 3 and parts[1] == "reports" and parts[0] not in live
        if orphan and info.modified < cutoff:
            found.append(info.key)
            if not dry_run:
                reg.store.delete(info.key)
    return found


def _protected(reg: Registry, name: str) -> set[int]:
    return {v for r in reg.aliases(name).values() for v in (r.version, *r.history)}


def _referenced(
    reg: Registry, cutoff: datetime, doomed: set[str], dry_run: bool, report: GcReport
) -> set[str]:
    keys, referenced = [], set()
    for name in reg.models():
        keys += [version_key(name, v.version) for v in reg.versions(name)]
        for info in reg.store.list(f"models/{name}/uploads/"):
            if info.modified < cutoff:  # a push that died: its blobs are orphans now
                report.other.append(info.key)
                if not dry_run:
                    reg.store.delete(info.key)
                continue
            with contextlib.suppress(NotFound):
                referenced.update(msgspec.json.decode(reg.store.get(info.key)[0])["blobs"])
    with ThreadPoolExecutor(8) as pool:
        for data in pool.map(lambda k: _get_or_none(reg, k), [k for k in keys if k not in doomed]):
            if data is not None:
                referenced.update(e.sha256 for e in decode(data).files())
    return referenced


def _get_or_none(reg: Registry, key: str) -> bytes | None:
    try:
        return reg.store.get(key)[0]
    except NotFound:
        return None
