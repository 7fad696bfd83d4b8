"""The shapes of /v1/registry: models, versions, aliases, gate results and events, as the
Model Library API answers them. Times are unix seconds, as in OpenAI's API; request bodies refuse
unknown fields and bound every number (a value out of bounds is a 400 naming the field)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from registry.gates import GatePolicy, GateResult
from registry.manifest import Manifest
from registry.names import MAX_NAME

AliasName = Annotated[str, Meta(min_length=1, max_length=MAX_NAME)]
Version = Annotated[int, Meta(ge=1)]
MAX_EVENTS = 100  # events per page


def ts(at: datetime | None) -> int | None:
    return None if at is None else int(at.timestamp())


# ── requests ──


class SetAlias(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    version: Version
    # the version the alias must point to now (0: it must not exist yet); 409 if it does not
    expect: Annotated[int, Meta(ge=0)] | None = None
    # the canary's share of the model's traffic; None or 0: an ordinary alias
    weight: Annotated[float, Meta(ge=0.0, le=1.0)] | None = None


class Promote(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    version: Version
    alias: AliasName


class Rollback(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    alias: AliasName


# ── answers ──


class Alias(msgspec.Struct, kw_only=True):
    version: int
    weight: float | None  # a canary's traffic share
    updated_at: int
    updated_by: str  # user:<id>, key:<id>, local, or the CLI's user
    history: list[int]  # earlier targets, oldest first; rollback returns to the last


class Model(msgspec.Struct, kw_only=True):
    object: Literal["registry.model"] = "registry.model"
    id: str  # the model name
    owner: str | None  # the project that owns it; None: shared by every project
    latest_version: int | None
    versions: int  # how many
    aliases: dict[str, Alias]


class ModelList(msgspec.Struct, kw_only=True):
    object: Literal["list"] = "list"
    data: list[Model]


class LineageSummary(msgspec.Struct, kw_only=True):
    job: str | None  # the fine-tuning job that trained it
    base_model: str | None
    training_file_sha256: str | None
    dataset_sha256: str | None


class VersionSummary(msgspec.Struct, kw_only=True):
    version: int
    created_at: int | None  # the package's own date; None when the manifest cannot be read
    pushed_at: int
    targets: list[str]
    # every artifact has a parity report that passed (None: the package has no parity reports)
    parity_passed: bool | None
    lineage: LineageSummary | None
    problem: str | None = None  # why the manifest could not be read


class ModelDetail(msgspec.Struct, kw_only=True):
    object: Literal["registry.model"] = "registry.model"
    id: str
    owner: str | None
    versions: list[VersionSummary]  # oldest first
    aliases: dict[str, Alias]
    gates: dict[str, GatePolicy]  # the policy a promotion to each alias is held to
    default_gates: GatePolicy  # the policy of any alias not listed in `gates`
    can_write: bool  # whether the caller may move this model's aliases


class VersionDetail(msgspec.Struct, kw_only=True):
    object: Literal["registry.version"] = "registry.version"
    model: str
    version: int
    pushed_at: int | None
    manifest: Manifest  # lineage, reports, artifacts, generation defaults: as stored


class GateCheck(msgspec.Struct, kw_only=True):
    object: Literal["registry.gate_check"] = "registry.gate_check"
    model: str
    version: int
    alias: str
    current_version: int | None  # the alias's version now, the baseline compared against
    passed: bool
    policy: GatePolicy
    data: list[GateResult]


class Event(msgspec.Struct, kw_only=True):
    object: Literal["registry.event"] = "registry.event"
    id: str
    created_at: int
    who: str
    host: str
    action: str  # push | alias | promote | rollback | gc
    version: int | None
    alias: str | None
    from_version: int | None
    weight: float | None
    forced: bool
    gates: list[GateResult]
    detail: str


class EventList(msgspec.Struct, kw_only=True):
    object: Literal["list"] = "list"
    data: list[Event]  # newest first
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


class AliasMove(msgspec.Struct, kw_only=True):
    object: Literal["registry.alias_move"] = "registry.alias_move"
    model: str
    alias: str
    from_version: int | None
    version: int
    changed: bool  # False: the alias pointed there already; nothing was written
    weight: float | None  # a canary's traffic share after the move
    gates: list[GateResult]  # the gates a promotion checked (empty for a plain move)
