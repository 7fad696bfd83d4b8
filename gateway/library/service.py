"""The Model Library: what /v1/registry answers, read and changed through
`registry.registry.Registry`. Synchronous (a registry reads files or S3): the routes run each call
in a worker thread, on a Registry made for the request so that its events name who.

Over HTTP every move of an alias to another version passes that alias's gates
(registry/gates.py): `promote` through Registry.promote, `set_alias` by checking them against the
version the alias points to now and moving it only if it still points there (compare-and-swap).
There is no `force`: the CLI's `promote --force` and `alias` are the operator's way past a gate.
A rollback returns to a version the alias served before, and checks none.

Who may move a model's aliases: `models:write` in the project that owns it (`model_owners`); a
shared model (no owner row) only a platform admin, or the open-access gateway.

The registry's errors become the control plane's, naming the field at fault: NotFound 404,
AliasConflict 409 (Conflict), bad input 400 (InvalidInput). GateFailed keeps its own row in
gateway/errors.py (422); a failing store or a bug stays ours (500, logged).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from controlplane.access import Principal, authorize
from controlplane.errors import Conflict, Forbidden, InvalidInput
from controlplane.errors import NotFound as Absent
from controlplane.identity import model_owners, role_of
from gateway.library import schemas as api
from registry import gates
from registry.errors import (
    AliasConflict,
    AlreadyExists,
    GateFailed,
    IntegrityError,
    NotFound,
    PreconditionFailed,
    RegistryError,
    StorageError,
)
from registry.manifest import Manifest, ManifestError
from registry.names import check_name
from registry.records import AliasRecord, Event, Move, VersionInfo
from registry.registry import Registry

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

WELL_KNOWN = ("production", "canary", "staging")  # aliases whose gates a model page shows


@contextlib.contextmanager
def _answers(param: str | None) -> Iterator[None]:
    """The registry's errors as the control plane's, with `param` the request field at fault."""
    try:
        yield
    except (GateFailed, StorageError, AlreadyExists, PreconditionFailed, IntegrityError):
        raise  # their own row, or ours to fix: not the request's fault
    except AliasConflict as e:
        raise Conflict(str(e), param) from None
    except NotFound as e:
        raise Absent(str(e), param) from None
    except RegistryError as e:
        raise InvalidInput(str(e), param) from None


# ── who may move aliases (in a control-plane transaction) ──


def check_move(s: Session, principal: Principal, name: str) -> None:
    """Raise unless `principal` may move `name`'s aliases."""
    _check_move(s, principal, name, model_owners(s).get(name))


def owner_and_access(s: Session, principal: Principal, name: str) -> tuple[str | None, bool]:
    """The project that owns `name` (None: shared), and whether `principal` may move it."""
    owner = model_owners(s).get(name)
    try:
        _check_move(s, principal, name, owner)
    except (Forbidden, Absent):
        return owner, False
    return owner, True


def _check_move(s: Session, principal: Principal, name: str, owner: str | None) -> None:
    if owner is None:
        if not principal.is_admin:
            raise Forbidden(
                f"{name} is a shared model (no project owns it): only a platform admin may move "
                f"its aliases, and {principal.actor} is not one"
            )
        return
    authorize(principal, "models:write", owner, lambda project, user: role_of(s, project, user))


# ── reading ──


def exists(reg: Registry, name: str) -> bool:
    with _answers("name"):
        return bool(reg.versions(name))


def summary(reg: Registry, name: str, owner: str | None) -> api.Model:
    versions = reg.versions(name)
    return api.Model(
        id=name,
        owner=owner,
        latest_version=versions[-1].version if versions else None,
        versions=len(versions),
        aliases={a: alias_view(r) for a, r in reg.aliases(name).items()},
    )


def detail(reg: Registry, name: str, owner: str | None, can_write: bool) -> api.ModelDetail:
    infos = reg.versions(name)
    with ThreadPoolExecutor(8) as pool:  # one manifest read per version: S3 round trips overlap
        versions = list(pool.map(lambda info: _version_summary(reg, name, info), infos))
    aliases = reg.aliases(name)
    with _answers(None):
        config = reg.gates_config()
    named = sorted({*WELL_KNOWN, *aliases, *config} - {"*"})
    return api.ModelDetail(
        id=name,
        owner=owner,
        versions=versions,
        aliases={a: alias_view(r) for a, r in aliases.items()},
        gates={a: gates.policy_for(config, a) for a in named},
        default_gates=gates.policy_for(config, "*"),
        can_write=can_write,
    )


def _version_summary(reg: Registry, name: str, info: VersionInfo) -> api.VersionSummary:
    pushed_at = api.ts(info.pushed_at)
    try:
        m = reg.manifest(name, info.version)
    except ManifestError as e:  # a newer major schema, or damaged: the rest of the page stands
        return api.VersionSummary(version=info.version, created_at=None, pushed_at=pushed_at,
                                  targets=[], parity_passed=None, lineage=None,
                                  problem=str(e))  # fmt: skip
    lineage = m.lineage
    return api.VersionSummary(
        version=info.version,
        created_at=api.ts(m.created_at),
        pushed_at=pushed_at,
        targets=[a.target for a in m.artifacts],
        parity_passed=_parity_passed(m),
        lineage=api.LineageSummary(
            job=lineage.job,
            base_model=lineage.base_model,
            training_file_sha256=lineage.training_file_sha256,
            dataset_sha256=lineage.dataset_sha256,
        ),
    )


def _parity_passed(m: Manifest) -> bool | None:
    """Every artifact has a parity report that passed unforced; None: no parity reports."""
    if not m.reports.parity:
        return None
    reports = [m.reports.parity.get(a.target) for a in m.artifacts]
    return all(r is not None and r.passed and not r.forced for r in reports)


def version(reg: Registry, name: str, number: int) -> api.VersionDetail:
    with _answers("version"):
        manifest = reg.manifest(name, number)
    pushed = [v.pushed_at for v in reg.versions(name) if v.version == number]
    return api.VersionDetail(
        model=name,
        version=number,
        pushed_at=api.ts(pushed[0]) if pushed else None,
        manifest=manifest,
    )


def gate_check(reg: Registry, name: str, number: int, alias: str) -> api.GateCheck:
    """The gates a move of `alias` to `number` meets now, against the alias's version now."""
    with _answers("alias"):
        check_name(alias, "alias")
        current = reg.alias(name, alias)
        policy = gates.policy_for(reg.gates_config(), alias)
    with _answers("version"):
        candidate = reg.manifest(name, number)
    now = current[0].version if current else None
    baseline = reg.manifest(name, now) if now is not None else None
    results = gates.check(candidate, baseline, policy)
    return api.GateCheck(
        model=name,
        version=number,
        alias=alias,
        current_version=now,
        passed=all(r.passed for r in results),
        policy=policy,
        data=results,
    )


def events(reg: Registry, name: str, *, after: str | None, limit: int) -> api.EventList:
    """`name`'s events, newest first: `limit` of them after the event `after`."""
    if not 1 <= limit <= api.MAX_EVENTS:
        raise InvalidInput(f"limit={limit} must be between 1 and {api.MAX_EVENTS}", "limit")
    found = reg.events(name)[::-1]
    if after is not None:
        ids = [e.id for e in found]
        if after not in ids:
            raise InvalidInput(f"after={after!r} is not an event of {name}", "after")
        found = found[ids.index(after) + 1 :]
    page = [event_view(e) for e in found[:limit]]
    return api.EventList(data=page, has_more=len(found) > limit,
                         first_id=page[0].id if page else None,
                         last_id=page[-1].id if page else None)  # fmt: skip


# ── changing ──


def set_alias(reg: Registry, name: str, alias: str, body: api.SetAlias) -> api.AliasMove:
    """Points `alias` at `body.version` (a canary with `body.weight`) if the gates pass for a
    new version, by compare-and-swap against the version they were checked against."""
    check = gate_check(reg, name, body.version, alias)
    now = check.current_version
    if body.expect is not None and body.expect != (now or 0):
        where = f"points to {now}" if now else "does not exist"
        want = f"point to {body.expect}" if body.expect else "not exist"
        raise Conflict(f"{name}@{alias} {where}; expect said it would {want}", "expect")
    if body.version != now and not check.passed:
        failed = [r for r in check.data if not r.passed]
        raise GateFailed(_refusal(name, body.version, alias, failed), failed)
    with _answers("alias"):
        move = reg.set_alias(name, alias, body.version, expect=now or 0, weight=body.weight)
    return move_view(move, body.weight)


def promote(reg: Registry, name: str, number: int, alias: str) -> api.AliasMove:
    with _answers("alias"):
        check_name(alias, "alias")
    with _answers("version"):
        move = reg.promote(name, number, alias)
    return move_view(move, None)


def rollback(reg: Registry, name: str, alias: str) -> api.AliasMove:
    with _answers("alias"):
        move = reg.rollback(name, alias)
    return move_view(move, None)


def _refusal(name: str, number: int, alias: str, failed: list[gates.GateResult]) -> str:
    """Registry.promote's words for a refusal: each failed gate named, with its detail."""
    names = ", ".join(r.gate for r in failed)
    details = "; ".join(f"{r.gate}: {r.detail}" for r in failed)
    return f"moving {name}@{alias} to {number} refused by gate {names} ({details})"


# ── views ──


def alias_view(r: AliasRecord) -> api.Alias:
    return api.Alias(version=r.version, weight=r.weight, updated_at=api.ts(r.updated_at),
                     updated_by=r.updated_by, history=list(r.history))  # fmt: skip


def event_view(e: Event) -> api.Event:
    return api.Event(id=e.id, created_at=api.ts(e.at), who=e.who, host=e.host, action=e.action,
                     version=e.version, alias=e.alias, from_version=e.from_version,
                     weight=e.weight, forced=e.forced, gates=list(e.gates),
                     detail=e.detail)  # fmt: skip


def move_view(move: Move, weight: float | None) -> api.AliasMove:
    return api.AliasMove(model=move.name, alias=move.alias, from_version=move.from_version,
                         version=move.version, changed=move.changed, weight=weight,
                         gates=list(move.gates))  # fmt: skip
