"""The console's overview over HTTP: what is loaded, the last hour of traffic, time to first
token and the training queue, in one call.

    GET /v1/overview?project_id=    authenticated

Traffic (requests, tokens, errors per minute) comes from the usage table
(controlplane/usage.py) and the job counts from controlplane/jobs.py, both for `project_id` or,
without it, for every project the caller may read (a platform admin: the whole platform). A key
reads its own project, and needs the scopes that read usage and jobs (admin and train). The
loaded models and the time to first token are this replica's (gateway/metrics), for the models
the caller may see.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Literal

import msgspec
from litestar import Request, get
from litestar.di import NamedDependency
from litestar.params import FromQuery

from controlplane import identity, jobs
from controlplane.access import Principal
from controlplane.errors import InvalidInput
from controlplane.models import utcnow
from controlplane.usage import UsageBucket, usage_report
from gateway.control.transaction import in_transaction
from gateway.errors import error_responses
from gateway.metrics import GatewayMetrics
from gateway.models.service import ModelManager

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

MINUTES = 60  # the window: the minute under way and the 59 before it
PROJECT_ID_CHARS = 32

log = logging.getLogger("aimass.gateway")


class LoadedModel(msgspec.Struct, kw_only=True):
    name: str
    version: int
    health: str  # the engine's: "ok", "dead", "stopped"; "unreachable" when it did not answer
    detail: str  # why, when not ok
    loaded_at: int | None  # unix seconds it finished loading on this replica
    in_flight: int  # requests it is serving now


class Minute(msgspec.Struct, kw_only=True):
    start_time: int  # unix seconds, the minute's start (UTC)
    requests: int
    tokens: int  # prompt + completion
    errors: int  # requests the engine accepted that ended in an error


class TimeToFirstToken(msgspec.Struct, kw_only=True):
    p50_s: float | None  # None: no request finished in the window
    p95_s: float | None
    requests: int  # generations observed in the window
    scope: Literal["replica"] = "replica"  # this gateway replica's requests, not the platform's


class JobCounts(msgspec.Struct, kw_only=True):
    running: int
    queued: int


class Overview(msgspec.Struct, kw_only=True):
    object: Literal["overview"] = "overview"
    project_id: str | None  # the project asked for; None: every project the caller may read
    created_at: int  # unix seconds: when these figures were read
    models: list[LoadedModel]
    minutes: list[Minute]  # the last hour, oldest first; the last is the minute under way
    requests_per_minute: int  # in the last complete minute
    tokens_per_minute: int  # likewise
    error_rate: float | None  # errors / requests over the hour; None without requests
    time_to_first_token: TimeToFirstToken  # over the last hour
    jobs: JobCounts


def _figures(
    s: Session, principal: Principal, project_id: str | None, start: datetime, end: datetime
) -> tuple[list[UsageBucket], dict[str, int]]:
    if project_id is not None:
        identity.get_project(s, principal, project_id)  # absent or not the caller's: 404
    buckets = usage_report(s, principal, start=start, end=end, project_id=project_id,
                           group_by="minute")  # fmt: skip
    return buckets, jobs.count_active(s, principal, project_id)


def _minutes(buckets: list[UsageBucket], start: datetime) -> list[Minute]:
    sums: dict[int, list[int]] = defaultdict(lambda: [0, 0, 0])
    for b in buckets:
        counts = sums[b.start_time]
        counts[0] += b.requests
        counts[1] += b.prompt_tokens + b.completion_tokens
        counts[2] += b.errors
    first = int(start.timestamp())
    return [
        Minute(start_time=t, requests=sums[t][0], tokens=sums[t][1], errors=sums[t][2])
        for t in range(first, first + MINUTES * 60, 60)
    ]


async def _models(
    request: Request, principal: Principal, models: ModelManager
) -> list[LoadedModel]:
    metrics: GatewayMetrics = request.app.state.metrics
    owners = request.app.state.model_owners
    deployments = models.deployments
    owners.exists({d.name for d in deployments})
    shown = []
    for d in deployments:
        if await owners.hidden(principal, d.name):
            continue
        try:
            health = await d.engine.health()
            status, detail = health.status, health.detail
        except Exception as e:  # a remote engine that does not answer is shown as such; its
            # address and error are the operator's (logged), not every viewer's
            log.warning("%s: health check failed: %s", d.ref, e)
            status, detail = "unreachable", "the engine did not answer its health check"
        loaded_at = metrics.loaded_since(d.name, str(d.version))
        shown.append(LoadedModel(name=d.name, version=d.version, health=status, detail=detail,
                                 loaded_at=None if loaded_at is None else int(loaded_at),
                                 in_flight=d.in_flight))  # fmt: skip
    return sorted(shown, key=lambda m: (m.name, m.version))


async def _ttft(request: Request, principal: Principal) -> TimeToFirstToken:
    window = request.app.state.metrics.ttft_window
    owners = request.app.state.model_owners
    names = window.models()
    owners.exists(names)
    visible = [n for n in names if not await owners.hidden(principal, n)]
    summary = window.summary(visible, (0.5, 0.95))
    p50, p95 = summary.quantiles
    return TimeToFirstToken(p50_s=p50, p95_s=p95, requests=summary.count)


@get("/v1/overview", opt={"action": "authenticated"},
     summary="The console's overview: loaded models, the last hour per minute, time to first "
             "token, running and queued jobs",
     responses=error_responses(400, 401, 403, 404))  # fmt: skip
async def get_overview(
    request: Request,
    principal: NamedDependency[Principal],
    models: NamedDependency[ModelManager],
    project_id: FromQuery[str | None] = None,
) -> Overview:
    if project_id is not None and len(project_id) > PROJECT_ID_CHARS:
        raise InvalidInput(
            f"project_id is {len(project_id)} characters; at most {PROJECT_ID_CHARS}", "project_id"
        )
    now = utcnow()
    start = now.replace(second=0, microsecond=0) - timedelta(minutes=MINUTES - 1)
    buckets, active = await in_transaction(request.app.state.db, _figures, principal, project_id,
                                           start, start + timedelta(minutes=MINUTES))  # fmt: skip
    minutes = _minutes(buckets, start)
    requests = sum(m.requests for m in minutes)
    return Overview(
        project_id=project_id,
        created_at=int(now.timestamp()),
        models=await _models(request, principal, models),
        minutes=minutes,
        requests_per_minute=minutes[-2].requests,
        tokens_per_minute=minutes[-2].tokens,
        error_rate=sum(m.errors for m in minutes) / requests if requests else None,
        time_to_first_token=await _ttft(request, principal),
        jobs=JobCounts(**active),
    )


ROUTES = [get_overview]
