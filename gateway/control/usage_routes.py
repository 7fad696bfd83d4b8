"""Usage, audit, platform configuration and project quotas over HTTP: handlers of a few lines
over the control-plane services (controlplane/usage.py, audit.py, settings.py, quotas.py), each
call in its own transaction off the event loop (gateway/control/transaction.py).

    GET   /v1/usage                   usage:read       buckets of tokens and requests (or CSV)
    GET   /v1/audit                   audit:read       the audit log, newest first
    GET   /v1/config                  authenticated    platform settings (none is secret)
    PATCH /v1/config                  settings:write   change settings (platform admins)
    GET   /v1/projects/{id}/quotas    project:read     a project's token quotas
    PATCH /v1/projects/{id}/quotas    projects:manage  change them (platform admins)

Every query parameter is bounded; one out of bounds is a 400 naming it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import msgspec
from litestar import Request, Response, get, patch
from litestar.di import NamedDependency
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import OpenAPIMediaType, OpenAPIType, Operation, Schema
from litestar.params import FromPath, FromQuery, JSONBody

from controlplane import audit, quotas, settings
from controlplane.access import Principal
from controlplane.errors import InvalidInput
from controlplane.models import utcnow
from controlplane.usage import parse_time, usage_report
from gateway.control import usage_schemas as api
from gateway.control.transaction import in_transaction
from gateway.errors import error_responses

DEFAULT_SPAN = timedelta(days=1)  # /v1/usage without start_time: the day before end_time
LENGTHS = {"project_id": 32, "key_id": 8, "model": 200, "actor": 64, "action": 64,
           "start_time": 40, "end_time": 40, "since": 40, "until": 40}  # fmt: skip
FORMATS = ("json", "csv")  # /v1/usage's answers
QUOTAS = "/v1/projects/{project_id:str}/quotas"


def _bounded(**values: str | None) -> None:
    for name, value in values.items():
        if value is not None and len(value) > LENGTHS[name]:
            raise InvalidInput(f"{name} is {len(value)} characters; at most {LENGTHS[name]}", name)


def _time(value: str | None, name: str) -> datetime | None:
    _bounded(**{name: value})
    return parse_time(value, name) if value is not None else None


@dataclass
class _JsonOrCsv(Operation):
    """/v1/usage's 200 in /docs/openapi.json: the page as JSON, or with format=csv a CSV file (a
    `ResponseSpec` holds one media type)."""

    def __post_init__(self) -> None:
        csv_file = Schema(type=OpenAPIType.STRING, content_media_type="text/csv",
                          description="A header row (" + ", ".join(api.CSV_COLUMNS) + "), then "
                          "one row per bucket; times ISO 8601 UTC")  # fmt: skip
        self.responses["200"].content["text/csv"] = OpenAPIMediaType(schema=csv_file)


USAGE_OK = ResponseSpec(api.UsagePage, description="The buckets; a CSV file with format=csv",
                        generate_examples=False)  # fmt: skip


@get("/v1/usage", opt={"action": "usage:read"}, operation_class=_JsonOrCsv,
     summary="Usage: requests and tokens per project, key and model, in time buckets",
     responses={200: USAGE_OK} | error_responses(400, 401, 403, 404))  # fmt: skip
async def get_usage(
    request: Request,
    principal: NamedDependency[Principal],
    project_id: FromQuery[str | None] = None,
    key_id: FromQuery[str | None] = None,
    model: FromQuery[str | None] = None,
    start_time: FromQuery[str | None] = None,
    end_time: FromQuery[str | None] = None,
    group_by: FromQuery[str] = "day",
    format: FromQuery[str] = "json",
) -> Response:
    if format not in FORMATS:  # before the query: a bad format costs no database work
        raise InvalidInput(f"format {format[:20]!r} must be one of: {', '.join(FORMATS)}",
                           "format")  # fmt: skip
    _bounded(project_id=project_id, key_id=key_id, model=model)
    end = _time(end_time, "end_time") or utcnow()
    start = _time(start_time, "start_time") or end - DEFAULT_SPAN
    buckets = await in_transaction(request.app.state.db, usage_report, principal, start=start,
                                   end=end, project_id=project_id, key_id=key_id, model=model,
                                   group_by=group_by)  # fmt: skip
    if format == "csv":  # the handler answers two media types, so it returns whole responses
        name = f"usage-{start:%Y%m%dT%H%MZ}-{end:%Y%m%dT%H%MZ}.csv"
        return Response(api.usage_csv(buckets), media_type="text/csv; charset=utf-8",
                        headers={"Content-Disposition": f'attachment; filename="{name}"'})  # fmt: skip
    return Response(api.UsagePage(start_time=int(start.timestamp()),
                                  end_time=int(end.timestamp()), group_by=group_by, data=buckets))  # fmt: skip


@get("/v1/audit", opt={"action": "audit:read"},
     summary="The audit log: who changed what, when, from what to what; newest first",
     responses=error_responses(400, 401, 403, 404))  # fmt: skip
async def get_audit(
    request: Request,
    principal: NamedDependency[Principal],
    project_id: FromQuery[str | None] = None,
    actor: FromQuery[str | None] = None,
    action: FromQuery[str | None] = None,
    since: FromQuery[str | None] = None,
    until: FromQuery[str | None] = None,
    limit: FromQuery[int] = 100,
    after: FromQuery[int | None] = None,
) -> api.AuditPage:
    _bounded(project_id=project_id, actor=actor, action=action)
    entries = await in_transaction(
        request.app.state.db, audit.list_audit, principal, project_id=project_id, actor=actor,
        action=action, since=_time(since, "since"), until=_time(until, "until"), limit=limit,
        after_id=after,
    )  # fmt: skip
    return api.AuditPage(data=entries, last_id=entries[-1].id if entries else None)


def _settings_list(values: dict[str, Any]) -> api.SettingList:
    return api.SettingList(
        data=[
            api.Setting(key=name, value=values[name], default=k.default, type=k.type.__name__,
                        min=k.low, max=k.high, nullable=k.nullable, description=k.help)
            for name, k in settings.KNOWN.items()
        ]
    )  # fmt: skip


@get("/v1/config", opt={"action": "authenticated"},
     summary="Platform settings: rate-limit and quota defaults, upload limit, default model",
     responses=error_responses(401))  # fmt: skip
async def get_config(request: Request) -> api.SettingList:
    return _settings_list(await in_transaction(request.app.state.db, settings.get_all))


@patch("/v1/config", opt={"action": "settings:write"},
       summary="Change platform settings (platform admins); every replica applies them within 5 s",
       responses=error_responses(400, 401, 403))  # fmt: skip
async def patch_config(
    request: Request, principal: NamedDependency[Principal], data: JSONBody[dict[str, Any]]
) -> api.SettingList:
    state = request.app.state
    values = await in_transaction(state.db, settings.set_values, principal, data)
    state.settings.invalidate()  # this replica at once; the others when their cache expires
    return _settings_list(values)


@get(QUOTAS, opt={"action": "project:read"}, summary="A project's token quotas",
     responses=error_responses(400, 401, 403, 404))  # fmt: skip
async def get_project_quotas(
    request: Request, principal: NamedDependency[Principal], project_id: FromPath[str]
) -> quotas.ProjectQuotas:
    return await in_transaction(request.app.state.db, quotas.get_quotas, principal, project_id)


@patch(QUOTAS, opt={"action": "projects:manage"},
       summary="Set a project's token quotas (platform admins)",
       responses=error_responses(400, 401, 403, 404))  # fmt: skip
async def patch_project_quotas(
    request: Request,
    principal: NamedDependency[Principal],
    project_id: FromPath[str],
    data: JSONBody[api.QuotasUpdate],
) -> quotas.ProjectQuotas:
    changes = {k: v for k, v in msgspec.structs.asdict(data).items() if v is not msgspec.UNSET}
    db = request.app.state.db
    return await in_transaction(db, quotas.set_quotas, principal, project_id, changes)


ROUTES = [get_usage, get_audit, get_config, patch_config, get_project_quotas,
          patch_project_quotas]  # fmt: skip
