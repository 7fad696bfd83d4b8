"""OpenAI-compatible routes: handlers of a few lines over `GenerationService`.

A generation is metered under the project it acts for: a key's own, or for a signed-in person
the one their `OpenAI-Project` header names (a 400 without one). The model "default" is the
platform's `default_model` setting, listed by /v1/models while it is set."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

import msgspec
from litestar import Request, Response, get, post
from litestar.di import NamedDependency
from litestar.params import HeaderParameter, JSONBody
from litestar.response import Stream

from controlplane.identity import PROJECT_HEADER, inference_project
from gateway.control.transaction import in_transaction
from gateway.errors import error_responses
from gateway.models.service import ModelManager
from gateway.openai import schemas as api
from gateway.openai.errors import ClientDisconnected
from gateway.openai.openapi import BEARER, generation_responses, json_or_events
from gateway.openai.service import (
    DEFAULT_MODEL,
    Caller,
    GenerationService,
    chat_template,
    check_visible,
)
from gateway.openai.validation import InvalidParameter, tokenize_input
from registry.errors import RegistryError
from registry.names import parse_ref

INFERENCE = {"action": "inference"}
READ = {"action": "models:read"}
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
Project = HeaderParameter(name=PROJECT_HEADER, required=False, max_length=100)
T = TypeVar("T")


async def _visible(request: Request, model: str) -> None:
    """404 for a model of a project the caller is not in (controlplane `model_owners`)."""
    owners = request.app.state.model_owners
    await check_visible(owners, request.state.get("principal"), model)


async def _caller(request: Request, project: str | None) -> Caller:
    """Whose request it is: a person acts for the project the header names, where they may
    `inference`; a key for its own (a header naming another is a 404); open access for no one."""
    principal, key = request.state["principal"], request.state.get("key")
    if principal.kind == "user" or (key is not None and project):
        db = request.app.state.db
        project_id = await in_transaction(db, inference_project, principal, project)
        if key is None:
            return Caller.person(principal, project_id)
    if key is not None:
        return Caller.of_key(principal, key)
    return Caller(principal)  # open access: not metered


async def _chosen(data: T, service: GenerationService) -> tuple[T, bool]:
    """`data` naming the registry model it asks for ("default": the setting's), and whether it
    asked for the default."""
    model = await service.chosen_model(data.model)
    if model == data.model:
        return data, False
    return msgspec.structs.replace(data, model=model), True


async def _generate(request: Request, data, service: GenerationService, project: str | None):
    data, by_default = await _chosen(data, service)
    await _visible(request, data.model)
    caller = await _caller(request, project)
    try:
        g = await service.start(data, caller, chosen_by_default=by_default)
    finally:
        # the access log's and metrics' model label: only a name the registry resolved (an
        # unknown name is the client's free text, and would be a new time series each time)
        if service.models.routed(data.model):
            request.state["model"] = data.model
    if data.stream:
        return Stream(
            service.sse(g),
            media_type="text/event-stream",
            headers=SSE_HEADERS | g.rate_headers,
        )
    return Response(await _unless_hung_up(request, service.complete(g)), headers=g.rate_headers)


async def _unless_hung_up(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """`work`'s result, unless the client hangs up first: then `work` is cancelled, which
    aborts its generation (ASGI servers do not cancel a handler whose client left, and a slot
    would decode a whole answer nobody reads)."""
    task = asyncio.ensure_future(work)
    hung_up = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((task, hung_up), return_when=asyncio.FIRST_COMPLETED)
    finally:
        hung_up.cancel()
        if not task.done():
            task.cancel()
            # its clean-up (abort, lease, rate-limit settlement) finishes before we answer
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise ClientDisconnected()
    return task.result()


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone; the body was read already, so `receive` has nothing
    else to say (ASGI: "http.disconnect" once the connection closes)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


@post(
    "/v1/completions",
    opt=INFERENCE,
    status_code=200,
    summary="Create a completion",
    security=BEARER,
    responses=generation_responses(api.Completion),
    operation_class=json_or_events(api.CompletionChunk),
)
async def completions(
    request: Request,
    data: JSONBody[api.CompletionRequest],
    generation: NamedDependency[GenerationService],
    project: str | None = Project,
) -> Response[api.Completion] | Stream:
    return await _generate(request, data, generation, project)


@post(
    "/v1/chat/completions",
    opt=INFERENCE,
    status_code=200,
    summary="Create a chat completion",
    security=BEARER,
    responses=generation_responses(api.ChatCompletion),
    operation_class=json_or_events(api.ChatCompletionChunk),
)
async def chat_completions(
    request: Request,
    data: JSONBody[api.ChatCompletionRequest],
    generation: NamedDependency[GenerationService],
    project: str | None = Project,
) -> Response[api.ChatCompletion] | Stream:
    return await _generate(request, data, generation, project)


@get(
    "/v1/models",
    opt=READ,
    summary="List the models this gateway routes",
    security=BEARER,
    responses=error_responses(401, 403, 500),
)
async def list_models(
    request: Request,
    models: NamedDependency[ModelManager],
    generation: NamedDependency[GenerationService],
) -> api.ModelList:
    registry = models.registry
    principal = request.state["principal"]
    owners = request.app.state.model_owners

    def read() -> list[api.Model]:
        found = []
        for name in registry.models():
            aliases = registry.aliases(name)
            if "production" in aliases:
                found.append(api.Model(id=name, created=_ts(aliases["production"])))
            found += [api.Model(id=f"{name}@{a}", created=_ts(r)) for a, r in aliases.items()]
        return found

    found = await asyncio.to_thread(read)
    owners.exists({m.id.partition("@")[0] for m in found})
    shown = [m for m in found if not await owners.hidden(principal, m.id.partition("@")[0])]
    default = _default_entry(await generation.default_model(), shown)
    return api.ModelList(data=[default, *shown] if default else shown)


def _default_entry(chosen: str | None, shown: list[api.Model]) -> api.Model | None:
    """ "default", while the setting names a model the caller sees listed (NAME, NAME@ALIAS or
    NAME:VERSION of a listed name): dated as that entry."""
    if chosen is None:
        return None
    try:
        name = parse_ref(chosen).name
    except RegistryError:
        return None
    same = [m for m in shown if m.id == chosen] or [
        m for m in shown if m.id.partition("@")[0] == name
    ]
    return api.Model(id=DEFAULT_MODEL, created=same[0].created) if same else None


@post(
    "/v1/tokenize",
    opt=INFERENCE,
    status_code=200,
    summary="Tokenize a prompt or chat messages",
    security=BEARER,
    responses=error_responses(400, 401, 403, 404, 413, 500, 503),
)
async def tokenize(
    request: Request,
    data: JSONBody[api.TokenizeRequest],
    models: NamedDependency[ModelManager],
    generation: NamedDependency[GenerationService],
) -> api.TokenizeResponse:
    if data.model is None:
        raise InvalidParameter("model", "model is required")
    data, _ = await _chosen(data, generation)
    await _visible(request, data.model)
    async with await models.acquire(data.model) as lease:
        d = lease.deployment
        await generation.check_new_name(request.state["principal"], data.model, d.name)
        source = tokenize_input(data)
        if isinstance(source, str):
            ids = d.tokenizer.encode(source, add_special_tokens=False).ids
        else:
            if not d.info.chat_template:
                raise InvalidParameter("messages", f"{d.ref} has no chat template")
            template = chat_template(d)
            text = template.render(source, add_generation_prompt=data.add_generation_prompt)
            ids = d.tokenizer.encode(text, add_special_tokens=False).ids
        strs = [d.tokenizer.id_to_token(i) for i in ids] if data.return_token_strs else None
        extra = {"token_strs": strs} if strs is not None else {}
        return api.TokenizeResponse(count=len(ids), max_model_len=d.info.max_len, tokens=ids,
                                    **extra)  # fmt: skip


def _ts(record) -> int:
    return int(record.updated_at.timestamp())


ROUTES = [completions, chat_completions, list_models, tokenize]
