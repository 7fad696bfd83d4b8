"""From a decoded OpenAI request to what the engine may be sent (TGI's `validation.rs` role).

msgspec has already checked types and bounds (schemas.py). This module refuses what decodes but
this server does not do, resolves defaults (request, then the model package's
`generation_defaults`, then the engine's), and builds `SamplingParams`. Every refusal is an
`InvalidParameter` naming the request field, the value and the limit, so the app's status table
can answer 400 with OpenAI's `{"error": {..., "param": ...}}` without parsing messages.
`InvalidParameter` and `param_from_validation_error` live in errors.py (a leaf the status table
imports) and are re-exported here, where callers look for them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from engine.request import SamplingParams
from gateway.openai.errors import InvalidParameter as InvalidParameter
from gateway.openai.errors import param_from_validation_error as param_from_validation_error
from gateway.openai.schemas import (
    ChatCompletionRequest,
    ChatMessageParam,
    CompletionRequest,
    TokenizeRequest,
)

AnyRequest = CompletionRequest | ChatCompletionRequest

# manifest generation_defaults that are sampling parameters (others, e.g. max_tokens, are not)
_DEFAULTABLE = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")


# --- refusals -------------------------------------------------------------------------------


def _refuse(param: str, value: Any, why: str) -> InvalidParameter:
    return InvalidParameter(param, f"{param}={value!r} is not supported: {why}")


def _check_common(req: AnyRequest) -> None:
    if req.stream_options is not None and not req.stream:
        raise InvalidParameter(
            "stream_options", "stream_options is only allowed when stream is true"
        )
    if req.logit_bias:
        raise _refuse("logit_bias", req.logit_bias, "this server does not bias tokens")


def _check_completion(req: CompletionRequest) -> None:
    if req.echo:
        raise _refuse("echo", req.echo, "the prompt is not returned with the completion")
    if req.suffix is not None:
        raise _refuse("suffix", req.suffix, "insertion (fill-in-the-middle) is not served")
    n = req.n or 1
    if req.best_of is not None and req.best_of != n:
        raise _refuse("best_of", req.best_of, f"best_of must equal n ({n}) or be omitted")
    prompt_inputs(req)  # a malformed prompt list


def _check_chat(req: ChatCompletionRequest) -> None:
    rf = req.response_format
    if rf is not None and rf.type != "text":
        raise _refuse("response_format", rf.type, 'only {"type": "text"} is served (no JSON mode)')
    if req.tools:
        raise _refuse("tools", f"[{len(req.tools)} tools]", "tool calling is not served")
    if req.tool_choice not in (None, "none", "auto"):
        raise _refuse("tool_choice", req.tool_choice, "tool calling is not served")
    if req.functions:
        raise _refuse("functions", f"[{len(req.functions)} functions]", "no function calling")
    if req.function_call not in (None, "none", "auto"):
        raise _refuse("function_call", req.function_call, "function calling is not served")
    if req.modalities and set(req.modalities) != {"text"}:
        raise _refuse("modalities", req.modalities, 'only ["text"] output is served')
    for name in ("audio", "web_search_options", "moderation"):
        if getattr(req, name) is not None:
            raise _refuse(name, getattr(req, name), f"{name} is not served by this server")
    if req.top_logprobs and not req.logprobs:
        raise InvalidParameter(
            "top_logprobs", f"top_logprobs={req.top_logprobs} requires logprobs=true"
        )
    template_messages(req.messages)  # tool messages, non-text parts


_CHECKS: dict[type, Callable[[Any], None]] = {
    CompletionRequest: _check_completion,
    ChatCompletionRequest: _check_chat,
}


def check_request(req: AnyRequest) -> None:
    """Raises InvalidParameter for anything that decodes but is not served."""
    _check_common(req)
    _CHECKS[type(req)](req)


# --- inputs ---------------------------------------------------------------------------------


def prompt_inputs(req: CompletionRequest | TokenizeRequest) -> list[str | list[int]]:
    """The prompts of a completion request, each a text or a list of token ids. OpenAI accepts a
    text, a list of texts, a list of token ids or a list of such lists; a list must be of one
    kind (the schema cannot say so: msgspec unions hold one array type)."""
    p, param = req.prompt, "prompt"
    if p is None:
        raise InvalidParameter(param, "prompt is required")
    if isinstance(p, str):
        return [p]
    if not p:
        raise InvalidParameter(param, "prompt must not be an empty list")
    if all(isinstance(x, int) for x in p):
        return [list(p)]
    for kind in (str, list):
        if all(isinstance(x, kind) for x in p):
            if kind is list and not all(p):
                raise InvalidParameter(param, "prompt must not contain an empty token list")
            return list(p)
    raise InvalidParameter(
        param, "prompt must be a string, a list of strings, a list of token ids or a list of them"
    )


def template_messages(messages: list[ChatMessageParam]) -> list[dict[str, str]]:
    """Messages as a chat template reads them: {"role", "content"[, "name"]}, content as one
    string. Text parts join with "\\n" (vLLM's rule for string-content templates); "developer"
    (OpenAI's new name for system) becomes "system", which HF templates know."""
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if m.role in ("tool", "function") or m.tool_calls or m.function_call is not None:
            raise InvalidParameter(where, f"{where}: tool and function calls are not served")
        if m.audio is not None:
            raise InvalidParameter(f"{where}.audio", f"{where}: audio is not served")
        content = m.content
        if content is None:
            if m.role != "assistant":
                raise InvalidParameter(f"{where}.content", f"{where}.content is required")
            content = ""
        elif not isinstance(content, str):
            for j, part in enumerate(content):
                if part.type != "text" or part.text is None:
                    raise InvalidParameter(
                        f"{where}.content[{j}]",
                        f"{where}.content[{j}].type={part.type!r} is not supported: "
                        "only text parts are served",
                    )
            content = "\n".join(part.text or "" for part in content)
        msg = {"role": "system" if m.role == "developer" else m.role, "content": content}
        if m.name is not None:
            msg["name"] = m.name
        out.append(msg)
    return out


def tokenize_input(req: TokenizeRequest) -> str | list[dict[str, str]]:
    """A /tokenize request's text, or its messages to render: exactly one must be given."""
    if (req.prompt is None) == (req.messages is None):
        raise InvalidParameter(
            "prompt" if req.prompt is None else "messages",
            "give exactly one of prompt and messages",
        )
    return req.prompt if req.prompt is not None else template_messages(req.messages or [])


# --- sampling, stops, lengths ---------------------------------------------------------------


def stop_strings(req: AnyRequest) -> tuple[str, ...]:
    """`stop` as a tuple; empty strings are dropped (they would stop before the first token)."""
    stop = req.stop
    if stop is None:
        return ()
    return tuple(s for s in ([stop] if isinstance(stop, str) else stop) if s)


def include_usage(req: AnyRequest) -> bool:
    """Whether a stream ends with a usage chunk (and every chunk carries `usage: null`)."""
    return bool(req.stream and req.stream_options and req.stream_options.include_usage)


def requested_max_tokens(req: AnyRequest) -> int | None:
    """The output length asked for; None lets `resolve_max_tokens` pick the default."""
    if isinstance(req, ChatCompletionRequest) and req.max_completion_tokens is not None:
        return req.max_completion_tokens
    return req.max_tokens


def _logprobs(req: AnyRequest) -> int | None:
    if isinstance(req, ChatCompletionRequest):
        return (req.top_logprobs or 0) if req.logprobs else None
    return req.logprobs


def to_sampling(req: AnyRequest, generation_defaults: Mapping[str, Any]) -> SamplingParams:
    """Sampling parameters for the engine: each field is the request's value, else the model
    package's default (`generation_defaults`, e.g. {"temperature": 0.7, "top_p": 0.9}), else the
    engine's. Refuses unsupported requests first, so no caller can skip `check_request`."""
    check_request(req)
    values: dict[str, Any] = {}
    for name in _DEFAULTABLE:
        value = getattr(req, name)
        if value is None:
            value = generation_defaults.get(name)
        if value is not None:
            values[name] = value
    if values.get("top_k", 0) < 0:  # vLLM's -1 means "all tokens", the engine's 0
        values["top_k"] = 0
    for name in ("presence_penalty", "frequency_penalty", "seed"):
        if (value := getattr(req, name)) is not None:
            values[name] = value
    return SamplingParams(n=req.n or 1, logprobs=_logprobs(req), **values)


def resolve_max_tokens(
    requested: int | None,
    prompt_tokens: int,
    max_len: int,
    default: int,
    *,
    prompt_name: str = "messages",
) -> int:
    """The output length to reserve: `requested` if it fits the context, else a 400 in OpenAI's
    words; None means `default`, cut to the room left (a long prompt still gets an answer).
    `prompt_name` is "messages" for chat and "prompt" for completions."""
    room = max_len - prompt_tokens
    if room <= 0:
        raise InvalidParameter(
            prompt_name,
            f"This model's maximum context length is {max_len} tokens. However, your "
            f"{prompt_name} resulted in {prompt_tokens} tokens. Please reduce the length of "
            f"the {prompt_name}.",
            code="context_length_exceeded",
        )
    if requested is None:
        return max(1, min(default, room))
    if requested > room:
        raise InvalidParameter(
            prompt_name,
            f"This model's maximum context length is {max_len} tokens. However, you requested "
            f"{prompt_tokens + requested} tokens ({prompt_tokens} in the {prompt_name}, "
            f"{requested} in the completion). Please reduce the length of the {prompt_name} "
            "or completion.",
            code="context_length_exceeded",
        )
    return requested
