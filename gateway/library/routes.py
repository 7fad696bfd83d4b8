"""The Model Library over HTTP: the registry's models, versions, aliases, gates and events
(gateway/library/service.py), handlers of a few lines run off the event loop.

    GET  /v1/registry/models                                    models:read
    GET  /v1/registry/models/{name}                             models:read
    GET  /v1/registry/models/{name}/versions/{version}          models:read   the manifest
    GET  /v1/registry/models/{name}/versions/{version}/gates    models:read   alias (production)
    GET  /v1/registry/models/{name}/events                      models:read   after, limit
    POST /v1/registry/models/{name}/aliases/{alias}             models:write  version, expect, weight
    POST /v1/registry/models/{name}/promote                     models:write  version, alias
    POST /v1/registry/models/{name}/rollback                    models:write  alias

A model is seen as /v1/models shows it: one that a project owns only by that project's members
and keys (`ModelOwners`), a shared one by everyone; any other name is the same 404 as a name the
registry lacks. Moving an alias needs `models:write` in the owning project, or for a shared model
a platform admin. Each request gets its own Registry naming the principal (`user:<id>`,
`key:<id>`, `local`), so the registry's events say who moved what; after a move this gateway's
routing reads the model's aliases afresh at its next request.
"""

from __future__ import annotations

import asyncio

import msgspec
from litestar import Request, Response, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, FromQuery, JSONBody

from controlplane.access import Principal
from controlplane.errors import NotFound
from controlplane.identity import model_owners
from gateway.control.transaction import in_transaction
from gateway.errors import classify, error_responses
from gateway.library import schemas as api
from gateway.library import service
from gateway.models.service import ModelManager
from registry.errors import GateFailed
from registry.registry import Registry

READ = {"action": "models:read"}
WRITE = {"action": "models:write"}
READ_ERRORS = error_responses(400, 401, 403, 404)
WRITE_ERRORS = error_responses(400, 401, 403, 404, 409, 422)
MODEL = "/v1/registry/models/{name:str}"
VERSION = MODEL + "/versions/{version:int}"
Me = NamedDependency[Principal]
Models = NamedDependency[ModelManager]
Name = FromPath[str]  # a model or alias name (the registry checks it: 400)
Number = FromPath[int]


def _registry(request: Request, principal: Principal) -> Registry:
    return Registry(request.app.state.catalog.store, user=principal.actor)


async def _visible(request: Request, principal: Principal, name: str) -> Registry:
    """The request's Registry, once `name` is a model the caller may see: otherwise the same
    404 whether the registry lacks it or another project owns it."""
    reg = _registry(request, principal)
    found = await asyncio.to_thread(service.exists, reg, name)
    owners = request.app.state.model_owners
    if found:
        owners.exists([name])
    if not found or await owners.hidden(principal, name):
        raise NotFound(f"no model named {name!r} in the registry", "name")
    return reg


async def _writable(request: Request, principal: Principal, name: str) -> Registry:
    reg = await _visible(request, principal, name)
    await in_transaction(request.app.state.db, service.check_move, principal, name)
    return reg


def _moved(models: ModelManager, move: api.AliasMove) -> api.AliasMove:
    if move.changed:
        models.alias_moved(move.model)
    return move


def _refused(request: Request, exc: GateFailed) -> Response:
    """OpenAI's error body, and beside it the results of the gates that failed."""
    status, payload, headers = classify(exc)
    request.state["error"] = payload["error"]["code"]
    payload["gates"] = msgspec.to_builtins(exc.failed)
    return Response(payload, status_code=status, headers=headers)


GATED = {GateFailed: _refused}


@get("/v1/registry/models", opt=READ, responses=READ_ERRORS,
     summary="The registry's models the caller may see, with their aliases")  # fmt: skip
async def list_models(request: Request, principal: Me) -> api.ModelList:
    reg = _registry(request, principal)
    names = await asyncio.to_thread(reg.models)
    owners = request.app.state.model_owners
    owners.exists(names)
    shown = [n for n in names if not await owners.hidden(principal, n)]
    owned = await in_transaction(request.app.state.db, model_owners)

    def read() -> list[api.Model]:
        found = [service.summary(reg, n, owned.get(n)) for n in shown]
        return [m for m in found if m.versions]  # a first push still under way is no model

    return api.ModelList(data=await asyncio.to_thread(read))


@get(MODEL, opt=READ, responses=READ_ERRORS,
     summary="A model: its versions, aliases and the gates of each alias")  # fmt: skip
async def retrieve_model(request: Request, principal: Me, name: Name) -> api.ModelDetail:
    reg = await _visible(request, principal, name)
    db = request.app.state.db
    owner, can_write = await in_transaction(db, service.owner_and_access, principal, name)
    return await asyncio.to_thread(service.detail, reg, name, owner, can_write)


@get(VERSION, opt=READ, responses=READ_ERRORS,
     summary="A version's manifest: lineage, reports, artifacts, generation defaults")  # fmt: skip
async def retrieve_version(
    request: Request, principal: Me, name: Name, version: Number
) -> api.VersionDetail:
    reg = await _visible(request, principal, name)
    return await asyncio.to_thread(service.version, reg, name, version)


@get(VERSION + "/gates", opt=READ, responses=READ_ERRORS,
     summary="The gates a promotion of this version to the alias would meet now (moves nothing)")  # fmt: skip
async def check_gates(
    request: Request,
    principal: Me,
    name: Name,
    version: Number,
    alias: FromQuery[str] = "production",
) -> api.GateCheck:
    reg = await _visible(request, principal, name)
    return await asyncio.to_thread(service.gate_check, reg, name, version, alias)


@get(MODEL + "/events", opt=READ, responses=READ_ERRORS,
     summary="The model's registry events (pushes, moves), newest first")  # fmt: skip
async def list_events(
    request: Request,
    principal: Me,
    name: Name,
    after: FromQuery[str | None] = None,
    limit: FromQuery[int] = 20,
) -> api.EventList:
    reg = await _visible(request, principal, name)
    return await asyncio.to_thread(service.events, reg, name, after=after, limit=limit)


@post(MODEL + "/aliases/{alias:str}", opt=WRITE, status_code=200, responses=WRITE_ERRORS,
      exception_handlers=GATED,
      summary="Point an alias at a version (a canary with a weight), by compare-and-swap")  # fmt: skip
async def set_alias(
    request: Request, principal: Me, models: Models, name: Name, alias: Name,
    data: JSONBody[api.SetAlias],
) -> api.AliasMove:  # fmt: skip
    reg = await _writable(request, principal, name)
    return _moved(models, await asyncio.to_thread(service.set_alias, reg, name, alias, data))


@post(MODEL + "/promote", opt=WRITE, status_code=200, responses=WRITE_ERRORS,
      exception_handlers=GATED, summary="Move an alias to a version if its gates pass")  # fmt: skip
async def promote(
    request: Request,
    principal: Me,
    models: Models,
    name: Name,
    data: JSONBody[api.Promote],
) -> api.AliasMove:
    reg = await _writable(request, principal, name)
    move = await asyncio.to_thread(service.promote, reg, name, data.version, data.alias)
    return _moved(models, move)


@post(MODEL + "/rollback", opt=WRITE, status_code=200, responses=WRITE_ERRORS,
      summary="Move an alias back to the version it pointed to before its last move")  # fmt: skip
async def rollback(
    request: Request,
    principal: Me,
    models: Models,
    name: Name,
    data: JSONBody[api.Rollback],
) -> api.AliasMove:
    reg = await _writable(request, principal, name)
    return _moved(models, await asyncio.to_thread(service.rollback, reg, name, data.alias))


ROUTES = [list_models, retrieve_model, retrieve_version, check_gates, list_events, set_alias,
          promote, rollback]  # fmt: skip
