"""Registry operations: push, read, aliases, promote, rollback, events, gc.

The store's key layout is registry/layout.py's.

A push uploads every blob first and writes the manifest last, create-only, at the next free
number; if that number is taken it tries the next. Until the manifest exists nothing of the push
is visible, so an interrupted push leaves only blobs that gc removes. A pulled package is the
manifest plus its blobs under their listed paths: the same bytes as the folder pushed.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec

from registry import gates
from registry.backends import Store
from registry.errors import (
    AliasConflict,
    AlreadyExists,
    GateFailed,
    NotFound,
    PreconditionFailed,
    RegistryError,
    ReportConflict,
    StorageError,
)
from registry.gc import collect
from registry.layout import (
    GATES_KEY,
    alias_key,
    blob_key,
    report_key,
    reports_prefix,
    version_key,
)
from registry.manifest import (
    MANIFEST,
    Manifest,
    ManifestError,
    decode,
    load,
    path_problem,
    with_attached,
)
from registry.names import Ref, check_name, parse_ref
from registry.records import AliasRecord, Event, GcReport, Move, PushResult, VersionInfo
from registry.stores import open_store

HISTORY_KEEP = 10  # earlier targets an alias remembers: rollback walks back, gc keeps them


def default_user() -> str:
    return os.environ.get("AIMASS_USER") or getpass.getuser()


class Registry:
    def __init__(self, store: Store, *, user: str | None = None):
        self.store = store
        self.user = user or default_user()
        self.host = socket.gethostname()

    @classmethod
    def open(cls, uri: str, **kw) -> Registry:
        return cls(open_store(uri), **kw)

    # ---- reading ----

    def models(self) -> list[str]:
        return sorted(self.store.list_dirs("models/"))

    def versions(self, name: str) -> list[VersionInfo]:
        found, prefix = [], f"models/{check_name(name)}/versions/"
        for info in self.store.list(prefix):
            parts = info.key[len(prefix) :].split("/")
            if len(parts) == 2 and parts[0].isdigit() and parts[1] == MANIFEST:
                found.append(VersionInfo(int(parts[0]), info.modified))
        return sorted(found, key=lambda v: v.version)

    def alias(self, name: str, alias: str) -> tuple[AliasRecord, str] | None:
        try:
            data, etag = self.store.get(alias_key(check_name(name), check_name(alias, "alias")))
        except NotFound:
            return None
        return msgspec.json.decode(data, type=AliasRecord), etag

    def aliases(self, name: str) -> dict[str, AliasRecord]:
        found = {}
        for info in self.store.list(f"models/{check_name(name)}/aliases/"):
            alias = info.key.rsplit("/", 1)[-1].removesuffix(".json")
            if (got := self.alias(name, alias)) is not None:
                found[alias] = got[0]
        return dict(sorted(found.items()))

    def resolve(self, ref: Ref | str) -> tuple[str, int]:
        """NAME (latest), NAME:VERSION or NAME@ALIAS → (name, version); NotFound if absent."""
        ref = parse_ref(ref) if isinstance(ref, str) else ref
        if ref.alias:
            got = self.alias(ref.name, ref.alias)
            if got is None:
                raise NotFound(f"{ref.name} has no alias {ref.alias!r}")
            return ref.name, got[0].version
        if ref.version:
            if self.store.stat(version_key(ref.name, ref.version)) is None:
                raise NotFound(f"{ref.name}:{ref.version} does not exist")
            return ref.name, ref.version
        versions = self.versions(ref.name)
        if not versions:
            raise NotFound(f"no model named {ref.name!r} in {self.store.uri}")
        return ref.name, versions[-1].version

    def manifest_bytes(self, name: str, version: int) -> bytes:
        try:
            return self.store.get(version_key(check_name(name), version))[0]
        except NotFound:
            raise NotFound(f"{name}:{version} does not exist") from None

    def manifest(self, name: str, version: int) -> Manifest:
        """The version's manifest with the reports attached since its push merged into
        `reports` (registry/manifest.py with_attached); manifest_bytes is the stored file."""
        manifest = decode(self.manifest_bytes(name, version))
        return with_attached(manifest, self._attached(name, version))

    def reports(self, name: str, version: int) -> dict[str, dict[str, Any]]:
        """The reports attached to a version, by kind; NotFound if the version does not exist."""
        if self.store.stat(version_key(check_name(name), version)) is None:
            raise NotFound(f"{name}:{version} does not exist")
        return self._attached(name, version)

    def _attached(self, name: str, version: int) -> dict[str, dict[str, Any]]:
        keys = [i.key for i in self.store.list(reports_prefix(name, version))]
        keys = [k for k in keys if k.endswith(".json")]
        with ThreadPoolExecutor(8) as pool:
            datas = list(pool.map(lambda k: _get_or_none(self.store, k), keys))
        found = {}
        for key, data in zip(keys, datas, strict=True):
            if data is None:
                continue  # deleted since the listing (its version was collected)
            try:
                found[key.rsplit("/", 1)[-1].removesuffix(".json")] = _decode_report(data)
            except msgspec.DecodeError as e:
                raise RegistryError(f"{self.store.uri}/{key}: not a JSON object: {e}") from None
        return dict(sorted(found.items()))

    def events(self, name: str) -> list[Event]:
        keys = sorted(i.key for i in self.store.list(f"models/{check_name(name)}/events/"))
        with ThreadPoolExecutor(8) as pool:
            datas = pool.map(lambda k: self.store.get(k)[0], keys)
            return [msgspec.json.decode(d, type=Event) for d in datas]

    def gates_config(self) -> gates.GatesConfig:
        try:
            data, _ = self.store.get(GATES_KEY)
        except NotFound:
            return {}
        try:
            return gates.decode_config(data)
        except ValueError as e:
            raise RegistryError(f"{self.store.uri}/{GATES_KEY}: {e}") from None

    def set_gates_config(self, data: bytes) -> None:
        try:
            config = gates.decode_config(data)
        except ValueError as e:
            raise RegistryError(str(e)) from None
        current = None
        with contextlib.suppress(NotFound):
            current = self.store.get(GATES_KEY)[1]
        try:
            self.store.put_if_match(GATES_KEY, msgspec.json.encode(config), current)
        except PreconditionFailed:
            raise AliasConflict("the gates config changed meanwhile; try again") from None

    # ---- changing ----

    def push(self, package_dir: str | Path, name: str) -> PushResult:
        """Stores the package folder as the next version of `name` and returns its number."""
        check_name(name)
        root = Path(package_dir)
        try:
            manifest = load(root)
        except ManifestError as e:
            raise RegistryError(str(e)) from None
        data = (root / MANIFEST).read_bytes()
        blobs = _package_blobs(root, manifest)
        listed = {e.path for e in manifest.files()} | {MANIFEST}
        unlisted = sorted(
            p.relative_to(root).as_posix()
            for p in root.rglob("*")
            if p.is_file() and p.relative_to(root).as_posix() not in listed
        )
        # gc keeps the blobs a push in progress names, even ones it finds already uploaded
        intent = f"models/{name}/uploads/{uuid.uuid4().hex}.json"
        self.store.put_new(intent, msgspec.json.encode({"blobs": sorted(blobs), "by": self.user}))
        try:
            uploaded = reused = 0
            found = {}  # blobs already stored: a gc may delete them before the version exists
            for sha, (path, size) in blobs.items():
                if self.store.upload_file(blob_key(sha), root / path, sha, size):
                    uploaded += size
                else:
                    reused += size
                    found[sha] = (path, size)
            version = self._allocate(name, data)
            self._heal(root, found)
            detail = f"{len(blobs)} blobs, {uploaded} bytes uploaded, {reused} bytes already stored"
            self._event("push", name, version=version, detail=detail)
        finally:
            self.store.delete(intent)
        return PushResult(name, version, uploaded, reused, unlisted)

    def attach_report(
        self,
        name: str,
        version: int,
        kind: str,
        report: dict[str, Any],
        *,
        expect_absent: bool = False,
    ) -> None:
        """Stores `report` as the version's report of `kind`, replacing the one there (a step
        run again). The write is a compare-and-swap against the report read just before, so
        two writers never interleave: ReportConflict when another wrote meanwhile, or, with
        `expect_absent`, when one is there already. NotFound if the version does not exist."""
        check_name(name)
        check_name(kind, "report kind")
        if not isinstance(report, dict):
            raise RegistryError(
                f"a {kind} report must be a JSON object, not {type(report).__name__}"
            )
        if self.store.stat(version_key(name, version)) is None:
            raise NotFound(f"{name}:{version} does not exist")
        try:
            data = msgspec.json.encode(report, order="deterministic")
        except (TypeError, msgspec.EncodeError) as e:
            raise RegistryError(f"the {kind} report cannot be stored as JSON: {e}") from None
        key = report_key(name, version, kind)
        etag = None
        with contextlib.suppress(NotFound):
            etag = self.store.get(key)[1]
        if etag is not None and expect_absent:
            raise ReportConflict(f"{name}:{version} already has a {kind} report")
        try:
            if etag is None:
                self.store.put_new(key, data)
            else:
                self.store.put_if_match(key, data, etag)
        except (AlreadyExists, PreconditionFailed):
            raise ReportConflict(
                f"the {kind} report of {name}:{version} was written by another writer while "
                "this one was being attached; nothing was changed: read it again and retry"
            ) from None
        if self.store.stat(version_key(name, version)) is None:
            self.store.delete(key)  # a gc took the version meanwhile: leave no orphan behind
            raise NotFound(f"{name}:{version} does not exist (deleted while attaching)")
        detail = "replaced the earlier report" if etag else "attached"
        self._event("report", name, version=version, kind=kind, detail=detail)

    def _allocate(self, name: str, data: bytes) -> int:
        versions = self.versions(name)
        number = versions[-1].version + 1 if versions else 1
        for _ in range(10_000):
            try:
                self.store.put_new(version_key(name, number), data)
                return number
            except AlreadyExists:
                number += 1  # another push took it: versions are dense, so try the next
        raise StorageError(f"could not allocate a version of {name} (tried up to {number})")

    def _heal(self, root: Path, blobs: dict[str, tuple[str, int]]) -> None:
        """A gc running during the push may have removed a blob it found unreferenced."""
        for sha, (path, size) in blobs.items():
            if self.store.stat(blob_key(sha)) is None:
                self.store.upload_file(blob_key(sha), root / path, sha, size)

    def set_alias(
        self,
        name: str,
        alias: str,
        version: int,
        *,
        expect: int | None = None,
        weight: float | None = None,
    ) -> Move:
        """Points `alias` at `version` by compare-and-swap. `expect`: the version the alias must
        point to now (0: it must not exist yet); AliasConflict if it does not, or if it moves
        between the read and the write. `weight` in [0, 1] makes the alias a canary: the
        gateway sends that share of the model's traffic to it."""
        if weight is not None and not 0 <= weight <= 1:
            raise RegistryError(f"weight {weight} must be between 0 and 1")
        self._require_version(name, version)
        current, etag = self.alias(name, check_name(alias, "alias")) or (None, None)
        now = current.version if current else 0
        if expect is not None and expect != now:
            where = f"points to {now}" if now else "does not exist"
            want = f"point to {expect}" if expect else "not exist"
            raise AliasConflict(f"{name}@{alias} {where}; --expect said it would {want}")
        return self._move(name, alias, version, current, etag, "alias", weight=weight)

    def promote(
        self,
        name: str,
        version: int,
        alias: str,
        *,
        force: bool = False,
        policy: gates.GatePolicy | None = None,
    ) -> Move:
        """Moves `alias` to `version` if the gates pass (GateFailed naming them if not)."""
        candidate = self._require_version(name, version)
        current, etag = self.alias(name, check_name(alias, "alias")) or (None, None)
        baseline = self.manifest(name, current.version) if current else None
        policy = policy or gates.policy_for(self.gates_config(), alias)
        results = gates.check(candidate, baseline, policy)
        failed = [r for r in results if not r.passed]
        if failed and not force:
            names = ", ".join(r.gate for r in failed)
            details = "; ".join(f"{r.gate}: {r.detail}" for r in failed)
            raise GateFailed(
                f"promotion of {name}:{version} to {alias} refused by gate {names} ({details})",
                failed,
            )
        return self._move(
            name, alias, version, current, etag, "promote", forced=force, gate_results=results
        )

    def rollback(self, name: str, alias: str) -> Move:
        """Moves `alias` back to the target it had before its last move."""
        got = self.alias(name, check_name(alias, "alias"))
        if got is None:
            raise NotFound(f"{name} has no alias {alias!r}")
        current, etag = got
        if not current.history:
            raise RegistryError(f"{name}@{alias} has no earlier target to roll back to")
        target = current.history[-1]
        self._require_version(name, target)
        return self._move(name, alias, target, current, etag, "rollback")

    def _require_version(self, name: str, version: int) -> Manifest:
        try:
            return self.manifest(name, version)
        except ManifestError as e:
            raise RegistryError(f"{name}:{version}: {e}") from None

    def _move(
        self, name, alias, version, current, etag, action, *, forced=False, gate_results=(),
        weight=None,
    ):  # fmt: skip
        before = current.version if current else None
        if before == version and (current.weight if current else None) == weight:
            return Move(name, alias, before, version, False, list(gate_results))
        history = list(current.history) if current else []
        if action == "rollback":
            history.pop()
        elif current:
            history = (history + [current.version])[-HISTORY_KEEP:]
        record = AliasRecord(
            version=version,
            seq=(current.seq if current else 0) + 1,
            updated_at=datetime.now(UTC),
            updated_by=self.user,
            history=history,
            weight=weight,
        )
        try:
            self.store.put_if_match(alias_key(name, alias), msgspec.json.encode(record), etag)
        except PreconditionFailed:
            raise AliasConflict(
                f"{name}@{alias} moved while this {action} was being made (it pointed to "
                f"{before}); nothing was changed: read it again and retry"
            ) from None
        self._event(
            action,
            name,
            version=version,
            alias=alias,
            from_version=before,
            seq=record.seq,
            weight=weight,
            forced=forced,
            gates=list(gate_results),
        )
        return Move(name, alias, before, version, True, list(gate_results))

    def _event(self, action: str, name: str, **fields) -> Event:
        event = Event(
            id=uuid.uuid4().hex,
            at=datetime.now(UTC),
            who=self.user,
            host=self.host,
            action=action,
            name=name,
            **fields,
        )
        key = f"models/{name}/events/{time.time_ns():020d}-{event.id[:12]}.json"
        self.store.put_new(key, msgspec.json.encode(event))
        return event

    def gc(
        self, older_than: timedelta, *, dry_run: bool = False, now: datetime | None = None
    ) -> GcReport:
        """Deletes versions past `older_than` that no alias points to (now or in its history),
        then blobs no version and no push in progress names (registry/gc.py)."""
        return collect(self, older_than, dry_run=dry_run, now=now)


def _get_or_none(store: Store, key: str) -> bytes | None:
    try:
        return store.get(key)[0]
    except NotFound:
        return None


def _decode_report(data: bytes) -> dict[str, Any]:
    return msgspec.json.decode(data, type=dict[str, Any])


def _package_blobs(root: Path, manifest: Manifest) -> dict[str, tuple[str, int]]:
    """sha256 → (path, size) of every listed file, after checking paths and sizes (the hashes
    are checked as the files are uploaded, in the same read)."""
    blobs, seen = {}, set()
    for entry in manifest.files():
        problem = path_problem(entry.path)
        if problem is None and entry.path in seen:
            problem = f"{entry.path!r} is listed twice"
        seen.add(entry.path)
        full = root / entry.path
        if problem is None and not full.resolve().is_relative_to(root.resolve()):
            problem = f"{entry.path!r} resolves outside the package folder"
        if problem is None and not full.is_file():
            problem = f"{entry.path} is missing"
        if problem is None and full.stat().st_size != entry.size:
            problem = (
                f"{entry.path} has {full.stat().st_size} bytes, the manifest lists {entry.size}"
            )
        if problem:
            raise RegistryError(f"cannot push {root}: {problem}")
        blobs.setdefault(entry.sha256, (entry.path, entry.size))
    return blobs
