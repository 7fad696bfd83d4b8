"""Fine-tuning jobs: what OpenAI's `client.fine_tuning.jobs.*` calls, and the queue the workers
(`aimass worker`, worker/) take them from.

    queued ──claim──► running ──finish──► succeeded | failed | cancelled
      │                 │ heartbeat renews the lease; a lease that runs out (the worker died)
      └─cancel─► cancelled     puts the job up for claiming again: resumed from its last
                                checkpoint, or failed after `max_attempts` claims

Claiming is atomic on both backends. PostgreSQL: `SELECT … FOR UPDATE SKIP LOCKED`, so workers
racing for the queue each lock a different row without waiting. SQLite: an `UPDATE … WHERE id = ?
AND (status = 'queued' OR lease expired)`, which one writer at a time executes: of two workers
that saw the same row, the second updates nothing and tries the next. Uploaded files are
validated at upload, so a job is `queued` as soon as it is created (`validating_files` is never
held). Every change by a person or key is audited; a worker's finish is audited as
`worker:<id>`.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from controlplane import audit
from controlplane.access import Principal, authorize
from controlplane.errors import Conflict, InvalidInput, NotFound
from controlplane.files import (
    beyond,
    check_limit,
    file_row,
    project_scope,
    project_thing,
    role_lookup,
)
from controlplane.models import Job, JobCheckpoint, JobEvent, Member, ModelOwner, new_id, utcnow
from registry.errors import RegistryError
from registry.names import check_name, parse_ref

PRESETS = ("tiny", "small")  # train from scratch: the trainer's presets offered by the API
TERMINAL = ("succeeded", "failed", "cancelled")
MAX_LIST = 100
MAX_ATTEMPTS = 3

# Each hyperparameter's type and bounds (inclusive; `gt` for an open lower bound). OpenAI's
# n_epochs, batch_size and learning_rate_multiplier accept "auto" (our default).
BOUNDS: dict[str, tuple[type, dict[str, float]]] = {
    "n_epochs": (int, {"ge": 1, "le": 50}),
    "max_steps": (int, {"ge": 1, "le": 1_000_000}),
    "batch_size": (int, {"ge": 1, "le": 1024}),
    "learning_rate_multiplier": (float, {"gt": 0, "le": 100}),
    "learning_rate": (float, {"gt": 0, "le": 1}),
    "block_size": (int, {"ge": 8, "le": 8192}),
    "warmup_steps": (int, {"ge": 0, "le": 100_000}),
    "eval_interval": (int, {"ge": 1, "le": 1_000_000}),
}
AUTO = ("n_epochs", "batch_size", "learning_rate_multiplier")
MAX_SEED = 2**31 - 1


@dataclass(frozen=True)
class JobView:
    id: str
    project_id: str
    model: str
    training_file: str
    validation_file: str | None
    suffix: str | None
    hyperparameters: dict[str, Any]
    seed: int
    status: str
    error: dict[str, Any] | None
    fine_tuned_model: str | None
    trained_tokens: int | None
    result: dict[str, Any] | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    attempts: int
    max_attempts: int


def _view(j: Job) -> JobView:
    return JobView(id=j.id, project_id=j.project_id, model=j.model, training_file=j.training_file,
                   validation_file=j.validation_file, suffix=j.suffix,
                   hyperparameters=dict(j.hyperparameters), seed=j.seed, status=j.status,
                   error=j.error, fine_tuned_model=j.fine_tuned_model,
                   trained_tokens=j.trained_tokens, result=j.result, created_at=j.created_at,
                   started_at=j.started_at, finished_at=j.finished_at, attempts=j.attempts,
                   max_attempts=j.max_attempts)  # fmt: skip


@dataclass(frozen=True)
class EventView:
    seq: int  # ascending within a job: the stream's cursor
    job_id: str
    created_at: datetime
    level: str
    type: str
    message: str
    data: dict[str, Any] | None


@dataclass(frozen=True)
class CheckpointView:
    id: str
    job_id: str
    step: int
    metrics: dict[str, Any]
    created_at: datetime


# ── bounds ──


def check_hyperparameters(given: dict[str, Any] | None) -> dict[str, Any]:
    """The hyperparameters as the worker reads them: each checked against BOUNDS ("auto" and
    None dropped). InvalidInput names the field, the value and the bound."""
    out: dict[str, Any] = {}
    for name, value in (given or {}).items():
        param = f"hyperparameters.{name}"
        if name not in BOUNDS:
            raise InvalidInput(f"{param} is not a hyperparameter; known: {', '.join(BOUNDS)}",
                               param)  # fmt: skip
        if value is None or (value == "auto" and name in AUTO):
            continue
        kind, bounds = BOUNDS[name]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidInput(f"{param}={value!r} must be a number", param)
        if kind is int and value != int(value):
            raise InvalidInput(f"{param}={value!r} must be an integer", param)
        value = kind(value)
        for op, bound in bounds.items():
            ok = {"ge": value >= bound, "gt": value > bound, "le": value <= bound}[op]
            if not ok:
                sign = {"ge": ">=", "gt": ">", "le": "<="}[op]
                raise InvalidInput(f"{param}={value} must be {sign} {bound}", param)
        out[name] = value
    if "n_epochs" in out and "max_steps" in out:
        raise InvalidInput(
            "hyperparameters.n_epochs and hyperparameters.max_steps both given; give one",
            "hyperparameters.max_steps",
        )
    if "learning_rate" in out and "learning_rate_multiplier" in out:
        raise InvalidInput(
            "hyperparameters.learning_rate and learning_rate_multiplier both given; give one",
            "hyperparameters.learning_rate",
        )
    return out


def _check_model(s: Session, project_id: str, model: str, registry) -> None:
    """A preset, or a registry model visible to the project (another project's is absent)."""
    if model in PRESETS:
        return
    try:
        ref = parse_ref(model)
    except RegistryError as e:
        raise InvalidInput(f"model {model!r}: {e}; or a preset: {', '.join(PRESETS)}",
                           "model") from None  # fmt: skip
    owner = s.get(ModelOwner, ref.name)
    missing = NotFound(
        f"no model {model!r}: name a registry model (NAME or NAME:VERSION) or a preset "
        f"({', '.join(PRESETS)})",
        "model",
    )
    if owner is not None and owner.project_id != project_id:
        raise missing
    if registry is not None:
        try:
            registry.resolve(ref)
        except RegistryError:
            raise missing from None


def model_name(job_id: str, suffix: str | None) -> str:
    """The registry name a job's model is pushed under: its suffix, or ft-<job id>."""
    return suffix or f"ft-{job_id.removeprefix('ftjob-')}"


# ── the service ──


def create(
    s: Session,
    principal: Principal,
    *,
    project: str | None = None,
    model: str,
    training_file: str,
    validation_file: str | None = None,
    suffix: str | None = None,
    hyperparameters: dict[str, Any] | None = None,
    seed: int | None = None,
    registry=None,
) -> JobView:
    """Queue a job (jobs:write). Files must be `processed` files of the same project; `registry`
    (a registry.Registry), when given, confirms that a base model exists."""
    project_id = project_scope(s, principal, project)
    authorize(principal, "jobs:write", project_id, role_lookup(s))
    hp = check_hyperparameters(hyperparameters)
    if seed is None:
        seed = secrets.randbelow(MAX_SEED)
    elif isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise InvalidInput(f"seed={seed!r} must be an integer in 0..{MAX_SEED}", "seed")
    for param, file_id in (("training_file", training_file), ("validation_file", validation_file)):
        if file_id is None:
            continue
        row = _usable_file(s, principal, file_id, param)
        if row.project_id != project_id:
            raise NotFound(f"no file {file_id!r}", param)
    job_id = new_id("ftjob", "-")
    if suffix is not None:
        try:
            check_name(suffix, "suffix")
        except RegistryError as e:
            raise InvalidInput(str(e), "suffix") from None
    owner = s.get(ModelOwner, model_name(job_id, suffix))
    if owner is not None and owner.project_id != project_id:
        raise Conflict(f"the model name {suffix!r} belongs to another project; choose another "
                       "suffix", "suffix")  # fmt: skip
    _check_model(s, project_id, model, registry)
    row = Job(id=job_id, project_id=project_id, model=model, training_file=training_file,
              validation_file=validation_file, suffix=suffix, hyperparameters=hp, seed=seed,
              status="queued", created_by=principal.actor, created_at=utcnow(), attempts=0,
              max_attempts=MAX_ATTEMPTS, cancel_requested=False)  # fmt: skip
    s.add(row)
    audit.record(s, principal, "job.create", job_id, project_id=project_id,
                 after={"model": model, "training_file": training_file,
                        "hyperparameters": hp, "suffix": suffix})  # fmt: skip
    s.flush()
    return _view(row)


def _usable_file(s: Session, principal: Principal, file_id: str, param: str):
    try:
        row = file_row(s, principal, file_id)
    except NotFound:
        raise NotFound(f"no file {file_id!r}", param) from None
    if row.status != "processed":
        raise InvalidInput(f"file {file_id} is {row.status}, not processed", param)
    return row


def job_row(s: Session, principal: Principal, job_id: str, action: str = "jobs:read") -> Job:
    missing = NotFound(f"no fine-tuning job {job_id!r}", "job_id")
    return project_thing(s, principal, Job, job_id, action, missing)


def retrieve(s: Session, principal: Principal, job_id: str) -> JobView:
    return _view(job_row(s, principal, job_id))


def list_jobs(
    s: Session,
    principal: Principal,
    *,
    project: str | None = None,
    after: str | None = None,
    limit: int = 20,
) -> list[JobView]:
    """The project's jobs, newest first; `after` a job id: the page after it."""
    project_id = project_scope(s, principal, project)
    authorize(principal, "jobs:read", project_id, role_lookup(s))
    check_limit(limit, MAX_LIST)
    query = select(Job).where(Job.project_id == project_id)
    if after is not None:
        cursor = job_row(s, principal, after)
        query = query.where(beyond(Job, cursor.created_at, cursor.id, "desc"))
    rows = s.scalars(query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit))
    return [_view(j) for j in rows]


def count_active(s: Session, principal: Principal, project_id: str | None = None) -> dict[str, int]:
    """How many jobs are running and queued, {"running": n, "queued": n}: in `project_id`, else
    in every project `principal` may read (a platform admin: all; a key: its own; a person:
    theirs)."""
    active = ("running", "queued")
    query = select(Job.status, func.count()).where(Job.status.in_(active))
    if project_id is None and principal.kind == "key":
        project_id = principal.project_id
    if project_id is not None:
        authorize(principal, "jobs:read", project_id, role_lookup(s))
        query = query.where(Job.project_id == project_id)
    elif not principal.is_admin:
        mine = select(Member.project_id).where(Member.user_id == principal.id)
        query = query.where(Job.project_id.in_(mine))
    counts = dict(s.execute(query.group_by(Job.status)).all())
    return {status: counts.get(status, 0) for status in active}


def cancel(s: Session, principal: Principal, job_id: str) -> JobView:
    """A queued job is cancelled at once; a running one is asked to stop (its worker stops
    within seconds, after a checkpoint). A finished job is a Conflict."""
    row = job_row(s, principal, job_id, "jobs:write")
    before = {"status": row.status}
    if row.status in TERMINAL:
        raise Conflict(f"job {job_id} has already {row.status}; nothing to cancel", "job_id")
    row.cancel_requested = True
    if row.status != "running":
        row.status, row.finished_at = "cancelled", utcnow()
        _event(s, row.id, "info", "the job was cancelled before it started")
    else:
        _event(s, row.id, "info", "cancel requested: the worker stops after the current step")
    audit.record(s, principal, "job.cancel", job_id, project_id=row.project_id, before=before,
                 after={"status": row.status})  # fmt: skip
    s.flush()
    return _view(row)


def list_events(
    s: Session,
    principal: Principal,
    job_id: str,
    *,
    after: int | None = None,
    limit: int = 20,
    ascending: bool = False,
) -> list[EventView]:
    """The job's log lines and metric points. Newest first as OpenAI lists them (`after`: the
    page of older ones); `ascending` for a live view (`after`: the ones that came since)."""
    job_row(s, principal, job_id)
    check_limit(limit, 10_000)
    query = select(JobEvent).where(JobEvent.job_id == job_id)
    if after is not None:
        query = query.where(JobEvent.id > after if ascending else JobEvent.id < after)
    query = query.order_by(JobEvent.id if ascending else JobEvent.id.desc()).limit(limit)
    return [EventView(e.id, e.job_id, e.at, e.level, e.type, e.message, e.data)
            for e in s.scalars(query)]  # fmt: skip


def list_checkpoints(
    s: Session, principal: Principal, job_id: str, *, after: str | None = None, limit: int = 10
) -> list[CheckpointView]:
    """The job's checkpoints, newest step first; `after` a checkpoint id."""
    job_row(s, principal, job_id)
    check_limit(limit, MAX_LIST)
    query = select(JobCheckpoint).where(JobCheckpoint.job_id == job_id)
    if after is not None:
        cursor = s.get(JobCheckpoint, after)
        if cursor is None or cursor.job_id != job_id:
            raise NotFound(f"no checkpoint {after!r} of job {job_id}", "after")
        query = query.where(JobCheckpoint.step < cursor.step)
    rows = s.scalars(query.order_by(JobCheckpoint.step.desc()).limit(limit))
    return [CheckpointView(c.id, c.job_id, c.step, c.metrics, c.created_at) for c in rows]


def is_finished(s: Session, job_id: str) -> bool:
    status = s.scalar(select(Job.status).where(Job.id == job_id))
    return status in TERMINAL


# ── the queue, as workers use it ──


class LeaseLost(Exception):
    """The job is no longer this worker's: its lease ran out and another worker took it."""


@dataclass(frozen=True)
class Claimed:
    job: JobView
    resumed: bool  # an earlier attempt ran: continue from its last checkpoint


def claim(
    s: Session, worker_id: str, lease_s: float, now: datetime | None = None
) -> Claimed | None:
    """Take the oldest queued job, or one whose worker's lease ran out; None when there is
    none. An expired job that has used up its attempts is failed instead, with the reason."""
    now = now or utcnow()
    expired = (Job.status == "running") & (Job.lease_until < now)
    claimable = (Job.status == "queued") | expired
    for _ in range(100):  # each pass takes a job or drops one a racing worker took
        query = select(Job.id).where(claimable).order_by(Job.created_at, Job.id).limit(1)
        if s.get_bind().dialect.name == "postgresql":
            query = query.with_for_update(skip_locked=True)
        job_id = s.scalar(query)
        if job_id is None:
            return None
        taken = s.execute(
            update(Job)
            .where(Job.id == job_id, claimable)
            .values(
                worker_id=worker_id,
                lease_until=now + timedelta(seconds=lease_s),
                heartbeat_at=now,
                attempts=Job.attempts + 1,
                status="running",
            )  # fmt: skip
            .execution_options(synchronize_session=False)
        ).rowcount
        if taken != 1:
            continue  # SQLite: another worker updated it first
        row = s.get(Job, job_id, populate_existing=True)
        if row.cancel_requested:
            _finish(s, row, worker_id, "cancelled", message="cancelled while its worker was gone")
            continue
        if row.attempts > row.max_attempts:
            reason = (f"the job's worker stopped heartbeating {row.max_attempts} times "
                      f"(max_attempts={row.max_attempts}); last lease expired")  # fmt: skip
            _finish(s, row, worker_id, "failed", error={"code": "worker_lost", "message": reason,
                                                         "param": None})  # fmt: skip
            continue
        row.started_at = row.started_at or now
        resumed = row.attempts > 1
        verb = f"resumed by worker {worker_id} (attempt {row.attempts})" if resumed else (
            f"started by worker {worker_id}")  # fmt: skip
        _event(s, row.id, "info", f"the job was {verb}")
        s.flush()
        return Claimed(_view(row), resumed)
    return None


def heartbeat(s: Session, job_id: str, worker_id: str, lease_s: float) -> bool:
    """Renew the lease; True when a cancel was asked. LeaseLost when the job is not ours."""
    now = utcnow()
    row = s.get(Job, job_id, populate_existing=True, with_for_update=True)
    if row is None or row.worker_id != worker_id or row.status != "running":
        raise LeaseLost(f"job {job_id} is no longer held by worker {worker_id}")
    row.lease_until, row.heartbeat_at = now + timedelta(seconds=lease_s), now
    return bool(row.cancel_requested)


def add_event(
    s: Session, job_id: str, message: str, *, level: str = "info", data: dict | None = None
) -> None:
    _event(s, job_id, level, message, data)


def _event(s: Session, job_id: str, level: str, message: str, data: dict | None = None) -> None:
    s.add(JobEvent(job_id=job_id, at=utcnow(), level=level, type="metrics" if data else "message",
                   message=message, data=data))  # fmt: skip


def add_checkpoint(s: Session, job_id: str, step: int, metrics: dict[str, Any]) -> None:
    """Record a checkpoint the trainer wrote (once per step: a resumed run may write it again)."""
    if s.scalar(select(JobCheckpoint.id).where(JobCheckpoint.job_id == job_id,
                                               JobCheckpoint.step == step)) is None:  # fmt: skip
        s.add(JobCheckpoint(id=new_id("ftckpt", "-"), job_id=job_id, step=step, metrics=metrics,
                            created_at=utcnow()))  # fmt: skip


def last_metrics_step(s: Session, job_id: str) -> int:
    """The last step whose metrics were recorded (a resumed run reports only later ones)."""
    steps = s.scalars(
        select(JobEvent.data).where(JobEvent.job_id == job_id, JobEvent.type == "metrics")
        .order_by(JobEvent.id.desc()).limit(1)
    ).all()  # fmt: skip
    return int(steps[0]["step"]) if steps else 0


def own_model_name(
    s: Session, job_id: str, worker_id: str, registry_versions: Callable[[str], list] | None = None
) -> str:
    """The registry name the job's model is pushed under, made the job's project's (a row in
    model_owners, audited). Conflict when another project owns it, or when it is a shared model
    already in the registry (`registry_versions(name)` lists its versions)."""
    row = s.get(Job, job_id)
    name = model_name(row.id, row.suffix)
    owner = s.get(ModelOwner, name)
    if owner is not None and owner.project_id != row.project_id:
        raise Conflict(f"the model name {name!r} belongs to another project", "suffix")
    if owner is None:
        if registry_versions is not None and registry_versions(name):
            raise Conflict(f"the model name {name!r} is a shared registry model; choose another "
                           "suffix", "suffix")  # fmt: skip
        s.add(ModelOwner(name=name, project_id=row.project_id, created_at=utcnow()))
        audit.record(s, _worker(worker_id), "model.own", name, project_id=row.project_id,
                     after={"project_id": row.project_id, "job": job_id})  # fmt: skip
    return name


def release(s: Session, job_id: str, worker_id: str, message: str) -> None:
    """Put a job this worker stopped at a checkpoint (it is shutting down) back in the queue;
    the attempt does not count against max_attempts."""
    row = s.get(Job, job_id, populate_existing=True, with_for_update=True)
    if row is None or row.worker_id != worker_id or row.status != "running":
        raise LeaseLost(f"job {job_id} is no longer held by worker {worker_id}")
    row.status, row.worker_id, row.lease_until = "queued", None, None
    row.attempts = max(0, row.attempts - 1)
    _event(s, job_id, "info", f"worker {worker_id} stopped: {message}; the job is queued again")


def finish(
    s: Session,
    job_id: str,
    worker_id: str,
    status: str,
    *,
    message: str,
    error: dict[str, Any] | None = None,
    fine_tuned_model: str | None = None,
    trained_tokens: int | None = None,
    result: dict[str, Any] | None = None,
) -> JobView:
    """End a job this worker holds: succeeded, failed (with `error`) or cancelled."""
    row = s.get(Job, job_id, populate_existing=True, with_for_update=True)
    if row is None or row.worker_id != worker_id or row.status != "running":
        raise LeaseLost(f"job {job_id} is no longer held by worker {worker_id}")
    row.fine_tuned_model, row.trained_tokens, row.result = fine_tuned_model, trained_tokens, result
    _finish(s, row, worker_id, status, message=message, error=error)
    return _view(row)


def _finish(s: Session, row: Job, worker_id: str, status: str, *, message: str | None = None,
            error: dict[str, Any] | None = None) -> None:  # fmt: skip
    before = {"status": row.status}
    row.status, row.error, row.finished_at, row.lease_until = status, error, utcnow(), None
    text = message or (error or {}).get("message") or status
    _event(s, row.id, "error" if status == "failed" else "info", text)
    audit.record(s, _worker(worker_id), f"job.{status}", row.id, project_id=row.project_id,
                 before=before, after={"status": status, "fine_tuned_model": row.fine_tuned_model})  # fmt: skip
    s.flush()


def _worker(worker_id: str) -> Principal:
    return Principal("worker", worker_id, is_admin=True)
