"""Completions and chat completions: a validated API request → an engine request → a response or
a stream of server-sent events in OpenAI's chunk format.

Order of checks, cheapest first, so a refused request costs nothing downstream:
schema (msgspec) → unsupported parameters → route the model (may load it) → render and tokenize
the prompt → bounds (prompt tokens, max_tokens against the context) → rate limits (reserve
prompt + max_tokens × n tokens) → engine admission (queue full: 503). Once the engine accepted
it, the reservation is settled to the tokens really used when the request ends, however it ends.
A client that disconnects closes the stream, which aborts the request and frees its slot (a
non-streamed request is cancelled by its route to the same effect). A request whose output the
engine failed to produce ends alone with an "error" event: a 500, or an error event mid-stream.

Whose request it is (`Caller`) decides its metering: a key's requests are metered and
quota-checked under the key's project, a person's under the project they act for (key id ""),
open access not at all. The model "default" is the platform's `default_model` setting.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import msgspec

from controlplane.access import Principal
from controlplane.keys import KeyRecord
from controlplane.quotas import Quotas
from controlplane.settings import SettingsCache
from controlplane.usage import UsageRecorder
from engine.errors import EngineDead, Overloaded
from engine.outputs import RequestOutput
from engine.request import EngineRequest
from gateway.auth.service import ModelOwners
from gateway.errors import classify
from gateway.limits.errors import RateLimited, TooLargeForLimit
from gateway.limits.schemas import LimitDecision, headers, refusal_message
from gateway.limits.service import RateLimiter
from gateway.metrics import GatewayMetrics
from gateway.models.deployments import Deployment, Lease
from gateway.models.errors import ModelNotFound, ModelUnavailable
from gateway.models.routing import absent
from gateway.models.service import ModelManager
from gateway.openai import schemas as api
from gateway.openai.chat_template import (
    ChatTemplate,
    ChatTemplateError,
    NoChatTemplate,
    TemplateRaised,
)
from gateway.openai.errors import InvalidParameter, OutputFailed
from gateway.openai.validation import (
    check_request,
    include_usage,
    prompt_inputs,
    requested_max_tokens,
    resolve_max_tokens,
    stop_strings,
    template_messages,
    to_sampling,
)
from registry.errors import RegistryError
from registry.names import parse_ref

log = logging.getLogger(__name__)
DEFAULT_MODEL = "default"  # the model name that means the platform's default_model setting
AnyRequest = api.CompletionRequest | api.ChatCompletionRequest


@dataclass(frozen=True)
class Limits:
    # the longest prompt accepted, in tokens (also bounded by each model's context)
    max_prompt_tokens: int = 8192
    # the most output tokens one choice may ask for (also bounded by the context left)
    max_tokens: int = 4096
    # default rate limits for keys that set none (None = unlimited)
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None


@dataclass(frozen=True)
class Caller:
    """Whose request it is: who asks, the project its tokens are metered and quota-checked
    under, and the rate-limit bucket it draws from."""

    principal: Principal
    project_id: str | None = None  # None: open access, not metered
    key_id: str = ""  # the usage rows' key: "" for a person's request
    bucket: str | None = None  # the rate limiter's: a key id, "user:<id>"; None: anonymous
    requests_per_minute: int | None = None  # a key's own limits (None: the defaults)
    tokens_per_minute: int | None = None

    @classmethod
    def of_key(cls, principal: Principal, key: KeyRecord) -> Caller:
        return cls(principal, key.project_id, key.key_id, key.key_id,
                   key.requests_per_minute, key.tokens_per_minute)  # fmt: skip

    @classmethod
    def person(cls, principal: Principal, project_id: str) -> Caller:
        """A signed-in person acting for `project_id`; limited per person, not per project."""
        return cls(principal, project_id, "", f"user:{principal.id}")

    @property
    def limit_key(self) -> str:
        return self.bucket or "anonymous"


@dataclass
class Generation:
    """An accepted request: everything needed to answer it and to settle its accounting."""

    request: AnyRequest
    lease: Lease
    stream: object  # engine.api.RequestStream
    prompt_tokens: int
    n: int
    caller: Caller
    reserved: int
    decision: LimitDecision | None
    model: str  # the response's: as the request spelled it, or NAME:VERSION for "default"

    @property
    def deployment(self) -> Deployment:
        return self.lease.deployment

    @property
    def rate_headers(self) -> dict[str, str]:
        return headers(self.decision) if self.decision else {}


class GenerationService:
    def __init__(
        self,
        models: ModelManager,
        limiter: RateLimiter,
        metrics: GatewayMetrics,
        limits: Limits,
        *,
        usage: UsageRecorder | None = None,  # metering: every generation's tokens, when it ends
        quotas: Quotas | None = None,  # project token quotas, checked before admission
        settings: SettingsCache | None = None,  # rate-limit defaults, the default model
        owners: ModelOwners | None = None,  # which project a model belongs to
    ):
        self.models, self.limiter, self.metrics, self.limits = models, limiter, metrics, limits
        self.usage, self.quotas, self.settings, self.owners = usage, quotas, settings, owners
        self._reading: dict[str, asyncio.Future] = {}  # database reads under way, by what
        self._settling: set[asyncio.Task] = set()  # rate-limit settlements under way

    # ── accept ──

    async def default_model(self) -> str | None:
        """The platform's `default_model` setting (None: unset), through the settings cache."""
        return (await self._settings()).get("default_model")

    async def chosen_model(self, model: str) -> str:
        """The model a request's `model` names: "default" is the `default_model` setting (read
        at request time: a change applies within the settings cache's bound); ModelNotFound
        while it is unset. Any other spelling names itself."""
        if model != DEFAULT_MODEL:
            return model
        chosen = await self.default_model()
        if chosen is None:
            raise ModelNotFound(
                model,
                "no default model is set: name a model (GET /v1/models), or a platform admin "
                'sets one with PATCH /v1/config {"default_model": NAME}',
            )
        return chosen

    async def start(
        self, req: AnyRequest, caller: Caller, *, chosen_by_default: bool = False
    ) -> Generation:
        """Everything up to the engine's acceptance; raises the errors of the status table.
        `req.model` is a registry name; `chosen_by_default`: the client asked for "default",
        and the response names the version that answered."""
        check_request(req)
        if caller.project_id is not None:
            await self._check_quota(caller.project_id)
        lease = await self.models.acquire(req.model, sticky=caller.bucket or req.user)
        if lease.cold_start:
            self.metrics.cold_starts_total.labels(req.model).inc()
        reserved, decision = 0, None
        try:
            d = lease.deployment
            await self.check_new_name(caller.principal, req.model, d.name)
            ids = self._prompt_ids(req, d)
            if len(ids) > self.limits.max_prompt_tokens:
                raise InvalidParameter(
                    _prompt_param(req),
                    f"the prompt has {len(ids)} tokens; this gateway accepts at most "
                    f"{self.limits.max_prompt_tokens}",
                )
            requested = requested_max_tokens(req)
            if requested is not None and requested > self.limits.max_tokens:
                raise InvalidParameter(
                    "max_tokens",
                    f"max_tokens = {requested} exceeds this gateway's limit of "
                    f"{self.limits.max_tokens}",
                )
            default = min(
                int(d.info.generation_defaults.get("max_tokens", 256)), self.limits.max_tokens
            )
            max_tokens = resolve_max_tokens(
                requested, len(ids), d.info.max_len, default, prompt_name=_prompt_param(req)
            )
            sampling = to_sampling(req, d.info.generation_defaults)
            n = sampling.n
            reserved = len(ids) + max_tokens * n
            decision = await self._check_limits(caller, reserved)
            request = EngineRequest(
                request_id=uuid.uuid4().hex,
                prompt_token_ids=tuple(ids),
                max_tokens=max_tokens,
                stop_token_ids=() if req.ignore_eos else d.info.stop_ids,
                sampling=sampling,
                stop=stop_strings(req),
            )
            stream = await d.engine.submit(request)
        except BaseException as e:
            if _deployment_at_fault(e):
                self.metrics.observe_deployment(d.name, d.version, failed=True)
            lease.release()
            if decision is not None and decision.allowed:
                await self.limiter.settle(caller.limit_key, reserved, 0)
            raise
        model = d.ref if chosen_by_default else req.model
        return Generation(req, lease, stream, len(ids), n, caller, reserved, decision, model)

    async def check_new_name(self, principal: Principal, model: str, name: str) -> None:
        """After a model was acquired: if its name is new to the ownership cache (a model just
        pushed, whose owner row came first), ask again with the table read afresh."""
        if self.owners is not None and self.owners.exists([name]):
            await check_visible(self.owners, principal, model)

    def _prompt_ids(self, req: AnyRequest, d: Deployment) -> list[int]:
        if isinstance(req, api.ChatCompletionRequest):
            if not d.info.chat_template:
                raise NoChatTemplate(
                    f"{d.ref} has no chat template; use /v1/completions with a plain prompt"
                )
            text = chat_template(d).render(template_messages(req.messages))
            return d.tokenizer.encode(text, add_special_tokens=False).ids
        prompts = prompt_inputs(req)
        if len(prompts) != 1:
            raise InvalidParameter(
                "prompt", f"{len(prompts)} prompts in one request; send one prompt per request"
            )
        prompt = prompts[0]
        if isinstance(prompt, list):
            bad = [t for t in prompt if not 0 <= t < d.info.vocab_size]
            if bad:
                raise InvalidParameter(
                    "prompt",
                    f"token id {bad[0]} is outside the vocabulary (0..{d.info.vocab_size - 1})",
                )
            return prompt
        ids = d.tokenizer.encode(prompt, add_special_tokens=False).ids
        if not ids:
            raise InvalidParameter("prompt", "the prompt is empty; it must hold at least a token")
        return ids

    async def _check_limits(self, caller: Caller, tokens: int) -> LimitDecision | None:
        defaults = await self._settings()
        rpm = _first(caller.requests_per_minute, defaults.get("requests_per_minute"),
                     self.limits.requests_per_minute)  # fmt: skip
        tpm = _first(caller.tokens_per_minute, defaults.get("tokens_per_minute"),
                     self.limits.tokens_per_minute)  # fmt: skip
        if rpm is None and tpm is None:
            return None
        decision = await self.limiter.check_request(caller.limit_key, rpm, tpm, tokens)
        if decision.never:
            self.metrics.rate_limited_total.labels("too_large").inc()
            raise TooLargeForLimit(refusal_message(decision))
        if not decision.allowed:
            self.metrics.rate_limited_total.labels(decision.reason or "requests").inc()
            raise RateLimited(refusal_message(decision), decision.retry_after_s, headers(decision))
        return decision

    async def _check_quota(self, project_id: str) -> None:
        """QuotaExceeded if the project used a quota up; off the database while cached."""
        if self.quotas is None:
            return
        if self.quotas.stale(project_id):
            await self._read_once(f"quota:{project_id}", self.quotas.refresh, project_id)
        self.quotas.check(project_id)

    async def _settings(self) -> dict:
        if self.settings is None:
            return {}
        if self.settings.stale():
            return await self._read_once("settings", self.settings.refresh)
        return self.settings.values()

    async def _read_once(self, what: str, read, *args):
        """`read(*args)` in a thread, once for every request that finds the same cache stale at
        the same time (32 streams would otherwise send 32 identical queries)."""
        future = self._reading.get(what)
        if future is None:
            future = asyncio.ensure_future(asyncio.to_thread(read, *args))
            self._reading[what] = future
            future.add_done_callback(lambda _: self._reading.pop(what, None))
        return await asyncio.shield(future)

    # ── answer ──

    async def complete(self, g: Generation) -> api.Completion | api.ChatCompletion:
        """Waits for every choice and builds the whole response."""
        texts = [""] * g.n
        tokens: list[list] = [[] for _ in range(g.n)]
        finish: list[str | None] = [None] * g.n
        used = [0] * g.n  # output tokens of each choice so far
        failed = False
        try:
            async for out in g.stream:
                if out.finish_reason == "error":
                    raise self._failed(g, out)
                texts[out.index] += out.text
                tokens[out.index] += out.logprobs or ()
                used[out.index] = out.completion_tokens
                if out.finished:
                    finish[out.index] = out.finish_reason
                    self._observe(g, out)
        except (EngineDead, OutputFailed):
            failed = True
            raise
        finally:
            await self._end(g, sum(used), failed)
        completion = sum(used)
        usage = api.Usage(g.prompt_tokens, completion, g.prompt_tokens + completion)
        model = g.model
        if isinstance(g.request, api.ChatCompletionRequest):
            choices = [
                api.ChatChoice(
                    index=i,
                    message=api.ChatMessage(content=texts[i]),
                    logprobs=self._chat_logprobs(g, tokens[i]),
                    finish_reason=finish[i],
                )
                for i in range(g.n)
            ]
            return api.ChatCompletion(model=model, choices=choices, usage=usage)
        choices = [
            api.CompletionChoice(
                index=i,
                text=texts[i],
                logprobs=self._completion_logprobs(g, tokens[i]),
                finish_reason=finish[i],
            )
            for i in range(g.n)
        ]
        return api.Completion(model=model, choices=choices, usage=usage)

    async def sse(self, g: Generation) -> AsyncIterator[bytes]:
        """The response as server-sent events; always ends with `data: [DONE]`, even when the
        engine dies mid-stream (an error event comes first). Closing it aborts the request."""
        chat = isinstance(g.request, api.ChatCompletionRequest)
        rid = api.new_id("chatcmpl" if chat else "cmpl")
        created, model = api.now(), g.model
        usage_on = include_usage(g.request)
        # output tokens of each choice so far: a client that hangs up is charged for them too
        used = [0] * g.n
        enc = msgspec.json.encode
        failed = False
        try:
            if chat:  # OpenAI opens each choice with the role
                for i in range(g.n):
                    delta = api.ChatDelta(role="assistant", content="")
                    yield _event(enc(self._chat_chunk(rid, created, model, i, delta, None,
                                                      None, usage_on)))  # fmt: skip
            async for out in g.stream:
                if out.finish_reason == "error":
                    raise self._failed(g, out)
                used[out.index] = out.completion_tokens
                if out.finished:
                    self._observe(g, out)
                if not out.text and not out.finished:
                    continue
                if chat:
                    delta = api.ChatDelta(content=out.text) if out.text else api.ChatDelta()
                    logprobs = self._chat_logprobs(g, out.logprobs or ())
                    chunk = self._chat_chunk(
                        rid, created, model, out.index, delta, logprobs, out.finish_reason,
                        usage_on,
                    )  # fmt: skip
                else:
                    choice = api.CompletionChoice(
                        index=out.index,
                        text=out.text,
                        logprobs=self._completion_logprobs(g, out.logprobs or ()),
                        finish_reason=out.finish_reason,
                    )
                    chunk = api.CompletionChunk(
                        id=rid, created=created, model=model, choices=[choice],
                        **({"usage": None} if usage_on else {}),
                    )  # fmt: skip
                yield _event(enc(chunk))
            if usage_on:
                completion = sum(used)
                usage = api.Usage(g.prompt_tokens, completion, g.prompt_tokens + completion)
                cls = api.ChatCompletionChunk if chat else api.CompletionChunk
                yield _event(enc(cls(id=rid, created=created, model=model, choices=[],
                                     usage=usage)))  # fmt: skip
        except EngineDead as e:
            failed = True
            log.error("engine failed mid-stream: %s", e)
            self.metrics.engine_errors_total.labels(model, "dead").inc()
            _, body, _ = classify(e)
            yield _event(enc(body))
        except OutputFailed as e:
            failed = True
            _, body, _ = classify(e)  # a fault on our side: logged there
            yield _event(enc(body))
        finally:
            await self._end(g, sum(used), failed)
        yield b"data: [DONE]\n\n"

    # ── helpers ──

    async def _end(self, g: Generation, completion_tokens: int, failed: bool) -> None:
        """However the request ended: close the stream (aborts it if unfinished), return the
        lease, meter and charge the tokens really used."""
        try:
            await g.stream.aclose()
        finally:
            g.lease.release()
            self.metrics.observe_deployment(g.deployment.name, g.deployment.version, failed=failed)
            caller = g.caller
            if self.usage is not None and caller.project_id is not None:
                self.usage.record(caller.project_id, caller.key_id, g.request.model,
                                  g.prompt_tokens, completion_tokens, error=failed)  # fmt: skip
            if g.decision is not None:
                # A client that hangs up cancels the task this runs in (the stream's), and keeps
                # cancelling each await: the settlement runs as a task of its own, shielded, or
                # the key would keep paying for all the tokens reserved (Redis: a round trip).
                settle = asyncio.ensure_future(
                    self.limiter.settle(
                        caller.limit_key, g.reserved, g.prompt_tokens + completion_tokens
                    )
                )
                self._settling.add(settle)  # the loop holds tasks weakly
                settle.add_done_callback(self._settling.discard)
                await asyncio.shield(settle)

    def _failed(self, g: Generation, out: RequestOutput) -> OutputFailed:
        self.metrics.engine_errors_total.labels(g.request.model, "output").inc()
        return OutputFailed(str(g.deployment.ref), out.request_id, out.error)

    def _observe(self, g: Generation, out: RequestOutput) -> None:
        if out.timings is not None and out.finish_reason != "abort":
            prompt = g.prompt_tokens if out.index == 0 else 0
            self.metrics.observe_generation(
                g.request.model, out.timings, prompt, out.completion_tokens
            )
            d = g.deployment
            self.metrics.observe_deployment_ttft(d.name, d.version, out.timings.ttft_s)

    def _chat_chunk(self, rid, created, model, index, delta, logprobs, finish, usage_on):
        choice = api.ChatChunkChoice(
            index=index, delta=delta, logprobs=logprobs, finish_reason=finish
        )
        extra = {"usage": None} if usage_on else {}
        return api.ChatCompletionChunk(
            id=rid, created=created, model=model, choices=[choice], **extra
        )

    def _token(self, d: Deployment, token_id: int) -> tuple[str, list[int]]:
        raw = d.token_bytes[token_id]
        return raw.decode("utf-8", errors="replace"), list(raw)

    def _chat_logprobs(self, g: Generation, logprobs) -> api.ChatLogprobs | None:
        if not isinstance(g.request, api.ChatCompletionRequest) or not g.request.logprobs:
            return None
        d, content = g.deployment, []
        for lp in logprobs:
            text, raw = self._token(d, lp.token_id)
            top = []
            for tid, value in lp.top:
                t, b = self._token(d, tid)
                top.append(api.TopLogprob(token=t, logprob=value, bytes=b))
            content.append(
                api.TokenLogprob(token=text, logprob=lp.logprob, bytes=raw, top_logprobs=top)
            )
        return api.ChatLogprobs(content=content)

    def _completion_logprobs(self, g: Generation, logprobs) -> api.CompletionLogprobs | None:
        if not isinstance(g.request, api.CompletionRequest) or g.request.logprobs is None:
            return None
        d, out = g.deployment, api.CompletionLogprobs()
        offset = 0
        for lp in logprobs:
            text, _ = self._token(d, lp.token_id)
            out.tokens.append(text)
            out.token_logprobs.append(lp.logprob)
            out.top_logprobs.append({self._token(d, t)[0]: v for t, v in lp.top})
            out.text_offset.append(offset)
            offset += len(text)
        return out


async def check_visible(
    owners: ModelOwners, principal: Principal | None, model: str, action: str = "inference"
) -> None:
    """A model of a project the caller is not in is absent to them: the same 404, word for
    word, as a name the registry does not have; a member whose role does not allow `action`
    is refused (403). A spelling that is no model name is left to routing to refuse."""
    try:
        ref = parse_ref(model) if principal is not None else None
    except RegistryError:
        return
    if ref is not None and await owners.hidden(principal, ref.name, action):
        raise absent(ref)


def chat_template(d: Deployment) -> ChatTemplate:
    """`d`'s chat template (NoChatTemplate if it has none). Cheap per request: the template is
    compiled once per source text (`chat_template._compile`)."""
    info = d.info
    return ChatTemplate(info.chat_template, bos_token=info.bos_token, eos_token=info.eos_token)


def _deployment_at_fault(e: BaseException) -> bool:
    """Whether a request refused before the engine accepted it counts against the deployment it
    was routed to: its engine is full, dead or unreachable, or its chat template is broken; a
    caller's own 4xx, a rate limit or a cancelled request does not."""
    if isinstance(e, TemplateRaised):  # the template refused these messages: a 400
        return False
    return isinstance(e, (Overloaded, EngineDead, ModelUnavailable, ChatTemplateError))


def _first(*values: int | None) -> int | None:
    """The first value that is set: a key's own limit, the platform's default, the gateway's."""
    return next((v for v in values if v is not None), None)


def _event(data: bytes) -> bytes:
    return b"data: " + data + b"\n\n"


def _prompt_param(req: AnyRequest) -> str:
    return "messages" if isinstance(req, api.ChatCompletionRequest) else "prompt"
