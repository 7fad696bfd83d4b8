"""The OpenAI API's request and response bodies as msgspec Structs (plus vLLM's /tokenize).

Requests: msgspec checks types and numeric bounds while decoding (a `msgspec.ValidationError`
names the field, e.g. "Expected `float` <= 2.0 - at `$.temperature`"); `validation.py` refuses
what decodes but this server does not do (tools, JSON mode, echo, ...) with a message and a
`param`, and turns the rest into engine sampling parameters.

Unknown fields, decided per struct:

- The top-level requests forbid them, so a typo (`temprature`, `max_token`) is a 400 instead of a
  silently ignored setting. To keep every client payload decoding, each parameter the official
  client (openai-python, whose `create()` sends only the arguments given) can send is declared:
  the ones that cannot change our output are accepted and ignored (`store`, `metadata`,
  `service_tier`, `prompt_cache_*`, ...), the ones that would are refused by validation.py.
  Nearly every field is `X | None = None`: clients (LangChain, the OpenAI spec itself) send
  explicit nulls for "not set", and validation.py resolves the defaults.
- Messages and content parts allow them: OpenAI keeps adding per-message hints (e.g. a text
  part's `prompt_cache_breakpoint`) that only concern its own caching, and a message's
  meaning is carried by the declared fields.

Responses serialize as OpenAI's do: every field OpenAI always sends is always present, as
`null` when empty (`finish_reason`, `logprobs`); fields OpenAI sends only sometimes default to
`msgspec.UNSET`, which is never encoded (e.g. a chunk's `usage` is absent unless the client
asked for `include_usage`, then `null` on every chunk but the last).
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

MAX_N = 8  # choices per request: each holds a KV slot for the whole generation
MAX_STOP = 4  # OpenAI's limit on stop strings
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit for /v1/completions `logprobs`
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for /v1/chat/completions `top_logprobs`

Temperature = Annotated[float, Meta(ge=0.0, le=2.0)]
TopP = Annotated[float, Meta(gt=0.0, le=1.0)]
Penalty = Annotated[float, Meta(ge=-2.0, le=2.0)]
NChoices = Annotated[int, Meta(ge=1, le=MAX_N)]
MaxTokens = Annotated[int, Meta(ge=1)]  # the model's context length is checked per request
Seed = Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)]  # OpenAI: a signed 64-bit integer
Stop = str | Annotated[list[str], Meta(max_length=MAX_STOP)]
TopK = Annotated[int, Meta(ge=-1)]  # vLLM's convention: -1 (or 0) keeps every token
MinP = Annotated[float, Meta(ge=0.0, le=1.0)]
RepetitionPenalty = Annotated[float, Meta(gt=0.0)]  # vLLM's bound; 1 is off


def new_id(prefix: str) -> str:
    """OpenAI-style object ids: "chatcmpl-…", "cmpl-…"."""
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    """`created`: whole seconds since the epoch, as OpenAI sends it."""
    return int(time.time())


# --- requests -------------------------------------------------------------------------------


class StreamOptions(msgspec.Struct, forbid_unknown_fields=True):
    include_usage: bool | None = None  # one last chunk with `usage` and no choices
    include_obfuscation: bool | None = None  # OpenAI pads chunks against side channels; ignored


class ResponseFormat(msgspec.Struct, forbid_unknown_fields=True):
    type: str  # only "text" is served; "json_object" / "json_schema" are refused
    json_schema: Any = None


class ContentPart(msgspec.Struct):
    """One part of a message's content. Only {"type": "text"} parts are served; the payloads of
    other kinds (image_url, input_audio, file) decode as unknown fields and the part is
    refused by its type."""

    type: str
    text: str | None = None


class ChatMessageParam(msgspec.Struct):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None  # None only for an assistant's tool calls
    name: str | None = None  # a participant's name; passed to the chat template
    # tool calling is not served: validation.py refuses messages that carry these
    tool_calls: list[Any] | None = None
    tool_call_id: str | None = None
    function_call: Any = None
    refusal: str | None = None  # an assistant's earlier refusal; kept out of the prompt
    audio: Any = None


class CompletionRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """POST /v1/completions."""

    model: str
    # a text, a batch of texts, token ids, or a batch of token-id lists (msgspec unions allow one
    # array type, hence the item union; validation.py checks the list is of one kind)
    prompt: str | list[str | int | list[int]]
    max_tokens: MaxTokens | None = None  # None: the model's default, within the context left
    temperature: Temperature | None = None
    top_p: TopP | None = None
    n: NChoices | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None  # only with stream=true
    logprobs: Annotated[int, Meta(ge=0, le=MAX_COMPLETION_LOGPROBS)] | None = None
    stop: Stop | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    seed: Seed | None = None
    user: str | None = None  # the end user's id; accepted, not used
    # refused unless neutral: echo (true), best_of (!= n), suffix (any), logit_bias (non-empty)
    echo: bool | None = None
    best_of: NChoices | None = None
    suffix: str | None = None
    logit_bias: dict[str, float] | None = None
    # extensions, named as vLLM names them (openai-python: `extra_body={"top_k": 40}`)
    top_k: TopK | None = None
    min_p: MinP | None = None
    repetition_penalty: RepetitionPenalty | None = None
    # vLLM's extension: keep generating past the end-of-text token (exact lengths for benchmarks)
    ignore_eos: bool | None = None


class ChatCompletionRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """POST /v1/chat/completions."""

    model: str
    messages: Annotated[list[ChatMessageParam], Meta(min_length=1)]
    max_tokens: MaxTokens | None = None  # deprecated by OpenAI for max_completion_tokens
    max_completion_tokens: MaxTokens | None = None  # wins over max_tokens when both are given
    temperature: Temperature | None = None
    top_p: TopP | None = None
    n: NChoices | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None  # only with stream=true
    stop: Stop | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    seed: Seed | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Meta(ge=0, le=MAX_TOP_LOGPROBS)] | None = None  # needs logprobs
    user: str | None = None  # the end user's id; accepted, not used
    # refused unless neutral (validation.py says why): JSON mode, tools, functions, audio output,
    # web search, moderation, logit_bias
    response_format: ResponseFormat | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[Any] | None = None
    function_call: str | dict[str, Any] | None = None
    modalities: list[str] | None = None
    audio: Any = None
    web_search_options: Any = None
    moderation: Any = None
    logit_bias: dict[str, float] | None = None
    # accepted and ignored: they concern OpenAI's storage, billing, caching or reasoning models,
    # never the text a model without those features generates
    store: bool | None = None
    metadata: dict[str, str] | None = None
    parallel_tool_calls: bool | None = None
    service_tier: str | None = None
    prediction: Any = None
    prompt_cache_key: str | None = None
    prompt_cache_options: Any = None
    prompt_cache_retention: str | None = None
    reasoning_effort: str | None = None
    safety_identifier: str | None = None
    verbosity: str | None = None
    # extensions, named as vLLM names them (openai-python: `extra_body={"top_k": 40}`)
    top_k: TopK | None = None
    min_p: MinP | None = None
    repetition_penalty: RepetitionPenalty | None = None
    # vLLM's extension: keep generating past the end-of-text token (exact lengths for benchmarks)
    ignore_eos: bool | None = None


class TokenizeRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """POST /tokenize, as vLLM serves it: either `prompt` or `messages` (rendered with the
    model's chat template, as /v1/chat/completions would)."""

    model: str | None = None  # None: the server's only / default model
    prompt: str | None = None
    messages: list[ChatMessageParam] | None = None
    add_generation_prompt: bool = True  # messages only
    return_token_strs: bool = False


# --- responses ------------------------------------------------------------------------------


class Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(msgspec.Struct):
    """/v1/completions logprobs: parallel lists, one entry per output token."""

    tokens: list[str] = msgspec.field(default_factory=list)
    token_logprobs: list[float | None] = msgspec.field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = msgspec.field(default_factory=list)
    text_offset: list[int] = msgspec.field(default_factory=list)  # char offset of each token


class CompletionChoice(msgspec.Struct):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None  # always sent, null when not asked for
    finish_reason: str | None = None  # "stop" | "length"; null on stream chunks until the end


class Completion(msgspec.Struct, kw_only=True):
    id: str = msgspec.field(default_factory=lambda: new_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = msgspec.field(default_factory=now)
    model: str
    choices: list[CompletionChoice]
    system_fingerprint: str | None = None
    usage: Usage | None = None


class CompletionChunk(msgspec.Struct, kw_only=True):
    """One server-sent event of a streamed completion (OpenAI reuses `text_completion`)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    system_fingerprint: str | None = None
    usage: Usage | None | UnsetType = UNSET  # only with include_usage: null, then the totals


class TopLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int] | None  # the token's UTF-8 bytes (a token may hold part of a character)


class TokenLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]  # likeliest first; empty when top_logprobs=0


class ChatLogprobs(msgspec.Struct):
    content: list[TokenLogprob] | None
    refusal: list[TokenLogprob] | None = None


class ChatMessage(msgspec.Struct):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None  # always null: nothing here refuses; clients expect the key


class ChatChoice(msgspec.Struct):
    index: int
    message: ChatMessage
    logprobs: ChatLogprobs | None = None  # always sent, null when not asked for
    finish_reason: str | None = None


class ChatCompletion(msgspec.Struct, kw_only=True):
    id: str = msgspec.field(default_factory=lambda: new_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = msgspec.field(default_factory=now)
    model: str
    choices: list[ChatChoice]
    system_fingerprint: str | None = None
    usage: Usage | None = None


class ChatDelta(msgspec.Struct, omit_defaults=True):
    """What a chunk adds to a choice's message: `role` on the first chunk, then `content`
    pieces; the last chunk's delta is `{}` (OpenAI omits the keys, it does not send nulls)."""

    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(msgspec.Struct):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None  # always sent, null when not asked for
    finish_reason: str | None = None  # always sent: null until the choice's last chunk


class ChatCompletionChunk(msgspec.Struct, kw_only=True):
    id: str  # the same on every chunk of one response
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int  # the same on every chunk of one response
    model: str
    choices: list[ChatChunkChoice]  # empty on the final usage chunk
    system_fingerprint: str | None = None
    usage: Usage | None | UnsetType = UNSET  # only with include_usage: null, then the totals


class Model(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["model"] = "model"
    created: int = 0  # seconds; when the version was registered, if known
    owned_by: str = "aimass"
    max_model_len: int | UnsetType = UNSET  # vLLM's extension: prompt + completion tokens


class ModelList(msgspec.Struct):
    data: list[Model]
    object: Literal["list"] = "list"


class TokenizeResponse(msgspec.Struct, kw_only=True):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | UnsetType = UNSET  # only when return_token_strs was asked


class ErrorBody(msgspec.Struct):
    message: str
    type: str  # e.g. "invalid_request_error", "rate_limit_error", "server_error"
    param: str | None = None  # the request field at fault, when there is one
    code: str | None = None  # e.g. "context_length_exceeded", "model_not_found"


class ErrorResponse(msgspec.Struct):
    error: ErrorBody
