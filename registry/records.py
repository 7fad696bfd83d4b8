"""What the registry stores about aliases and changes, and what its operations return."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

import msgspec

from registry.gates import GateResult


class AliasRecord(msgspec.Struct, kw_only=True):
    version: int  # the version the alias points to
    seq: int  # moves so far: every write differs, so an etag never comes back (no ABA)
    updated_at: datetime
    updated_by: str
    history: list[int] = []  # earlier targets, oldest first; rollback returns to the last
    # the share of the model's traffic (requests for plain NAME) the gateway sends to this
    # alias's version instead of production's: a canary; None or 0 for an ordinary alias
    weight: float | None = None


class Event(msgspec.Struct, kw_only=True):
    id: str
    at: datetime  # UTC
    who: str  # AIMASS_USER, else the OS user
    host: str
    action: str  # push | alias | promote | rollback | gc | report
    name: str
    version: int | None = None  # pushed, deleted, or the alias's new target
    alias: str | None = None
    from_version: int | None = None  # the alias's target before the move
    seq: int | None = None  # the alias record's seq after the move
    forced: bool = False  # promote --force
    gates: list[GateResult] = []
    detail: str = ""
    weight: float | None = None  # a canary alias's traffic share after the move
    kind: str | None = None  # report events: the kind of report attached (eval, canary, ...)


@dataclass
class VersionInfo:
    version: int
    pushed_at: datetime


@dataclass
class PushResult:
    name: str
    version: int
    uploaded_bytes: int  # bytes sent; files already in the registry are not sent again
    reused_bytes: int
    unlisted: list[str] = field(default_factory=list)  # files in the folder the manifest omits


@dataclass
class Move:
    name: str
    alias: str
    from_version: int | None
    version: int
    changed: bool  # False: the alias already pointed there; nothing was written
    gates: list[GateResult] = field(default_factory=list)


@dataclass
class GcReport:
    versions: list[str] = field(default_factory=list)  # "name:version" deleted
    blobs: list[str] = field(default_factory=list)  # sha256 of blobs deleted
    other: list[str] = field(default_factory=list)  # stale uploads, temporary files
