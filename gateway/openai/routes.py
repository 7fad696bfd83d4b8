"""OpenAI-compatible routes: handlers of a few lines over `GenerationService`."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from litestar import Request, Response, get, post
from litestar.di import NamedDependency
from litestar.params import JSONBody
from litestar.response import Stream

from controlplane.keys import KeyRecord
from gateway.errors import error_responses
from gateway.models.errors import ModelNotFound
from gateway.models.service import ModelManager
from gateway.openai import schemas as api
from gateway.openai.errors import ClientDisconnected
from gateway.openai.openapi import BEARER, generation_responses, json_or_events
from gateway.openai.service import GenerationService, chat_template
from gateway.openai.validation import InvalidParameter, tokenize_input
from registry.errors import RegistryError
from registry.names import Ref, parse_ref

INFERENCE = {"action": "inference"}
READ = {"action": "models:read"}
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
T = TypeVar("T")


def _key(request: Request) -> KeyRecord | None:
    return request.state.get("key")


async def _visible(request: Request, model: str | None, action: str = "inference") -> None:
    """A model of a project the caller is not in is absent to them: the same 404, word for
    word, as a name the registry does not have (controlplane `model_owners`); a member whose
    role does not allow `action` is refused (403)."""
    principal = request.state.get("principal")
    try:
        ref = parse_ref(model) if model is not None and principal is not None else None
    except RegistryError:
        return  # routing refuses the spelling itself
    owners = request.app.state.model_owners
    if ref is not None and await owners.hidden(principal, ref.name, action):
        raise _absent(ref)


def _absent(ref: Ref) -> ModelNotFound:
    """What routing (gateway/models/routing.py) answers for a name the registry lacks."""
    if ref.alias is not None:
        return ModelNotFound(str(ref), f"{ref.name} has no alias {ref.alias!r}")
    if ref.version is not None:
        return ModelNotFound(str(ref), f"{ref.name}:{ref.version} does not exist")
    detail = f"model {ref.name!r} has no production alias; name a version or an alias"
    return ModelNotFound(ref.name, f"{detail} ({ref.name}:VERSION)")


async def _generate(request: Request, data, service: GenerationService):
    await _visible(request, data.model)
    try:
        g = await service.start(data, _key(request))
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
) -> Response[api.Completion] | Stream:
    return await _generate(request, data, generation)


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
) -> Response[api.ChatCompletion] | Stream:
    return await _generate(request, data, generation)


@get(
    "/v1/models",
    opt=READ,
    summary="List the models this gateway routes",
    security=BEARER,
    responses=error_responses(401, 403, 500),
)
async def list_models(request: Request, models: NamedDependency[ModelManager]) -> api.ModelList:
    registry = models.registry
    principal = request.state["principal"]
    hidden = request.app.state.model_owners.hidden

    def read() -> list[api.Model]:
        found = []
        for name in registry.models():
            aliases = registry.aliases(name)
            if "production" in aliases:
                found.append(api.Model(id=name, created=_ts(aliases["production"])))
            found += [api.Model(id=f"{name}@{a}", created=_ts(r)) for a, r in aliases.items()]
        return found

    found = await asyncio.to_thread(read)
    return api.ModelList(
        data=[m for m in found if not await hidden(principal, m.id.partition("@")[0])]
    )


@post(
    "/v1/tokenize",
    opt=INFERENCE,
    status_code=200,
    summary="Tokenize a prompt or chat messages",
    security=BEARER,
    responses=error_responses(400, 401, 403, 404, 413, 500, 503),
)
async def tokenize(
    request: Request, data: JSONBody[api.TokenizeRequest], models: NamedDependency[ModelManager]
) -> api.TokenizeResponse:
    if data.model is None:
        raise InvalidParameter("model", "model is required")
    await _visible(request, data.model)
    async with await models.acquire(data.model) as lease:
        d = lease.deployment
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
