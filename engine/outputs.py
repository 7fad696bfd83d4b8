"""What the engine hands back: one `RequestOutput` per request and step that produced something,
plus `EngineInfo`, `Health` and `EngineStats`.

These cross the engine server's socket, hence msgspec Structs in the compact array form; new
fields go last with defaults, so old and new peers still understand each other.
"""

from __future__ import annotations

import msgspec


class TokenLogprob(msgspec.Struct, frozen=True, array_like=True, gc=False):
    token_id: int
    logprob: float  # the raw model's log-probability of the chosen token
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob) alternatives, likeliest first


class Timings(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """Seconds, measured in the engine on one monotonic clock, for the whole request."""

    queue_s: float  # accepted → first scheduled (waiting for a slot)
    ttft_s: float  # accepted → first output token sampled
    e2e_s: float  # accepted → finished
    itl_s: tuple[float, ...] = ()  # the gaps between consecutive output tokens


class RequestOutput(msgspec.Struct, frozen=True, array_like=True, omit_defaults=True, gc=False):
    """New output of one choice of one request since its previous event.

    `text` is UTF-8-complete (a character split across tokens waits for its last byte) and never
    contains a stop string or the text after one. The last event of a choice has `finish_reason`
    set, the usage counts and the timings.
    """

    request_id: str
    index: int = 0  # the choice (0 .. n-1)
    text: str = ""
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprob, ...] | None = None  # one per token id, when asked for
    # "stop" (stop token or stop string), "length" (max_tokens), "abort", or "error": handling
    # this request's output failed; it ended alone and the engine serves on
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0  # output tokens of this choice so far
    timings: Timings | None = None  # on the last event only
    error: str | None = None  # with finish_reason "error": what failed

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class EngineInfo(msgspec.Struct, frozen=True, kw_only=True):
    """What a client needs to build requests for this engine, local or remote: it carries the
    tokenizer and chat template, so a gateway can front a remote engine without the package."""

    model: str  # the package's model name
    version: str | None  # the registry version the package came from, when known
    target: str  # the artifact running, e.g. "onnx-int4"
    provider: str  # e.g. "CPUExecutionProvider"
    max_len: int  # prompt + max_tokens of one request, at most
    n_slots: int
    vocab_size: int
    eos_id: int
    stop_ids: tuple[int, ...]  # end-of-generation tokens (EOS, end of turn)
    tokenizer_json: str  # the package's tokenizer.json, as text
    chat_template: str | None = None
    bos_token: str | None = None
    eos_token: str = ""
    generation_defaults: dict = {}  # the manifest's defaults (temperature, top_p, max_tokens)
    # the most its KV cache holds: kv_tokens positions (the pool), each kv_bytes / kv_tokens;
    # resident only as positions are written (EngineStats.kv_resident_bytes says how much now)
    kv_bytes: int = 0
    weights_bytes: int = 0  # the artifact's files, which the engine loads (a remote one: its own)
    kv_tokens: int = 0  # the pool of positions the slots share (0: from an older engine)


class Health(msgspec.Struct, frozen=True, kw_only=True):
    ok: bool
    status: str  # "ok", "dead" or "stopped"
    detail: str = ""  # why, when not ok


class EngineStats(msgspec.Struct, frozen=True, kw_only=True):
    slots_total: int
    slots_used: int
    queue_depth: int  # requests waiting for a slot
    max_waiting: int
    kv_tokens_used: int  # tokens reserved in the KV cache
    kv_tokens_total: int
    kv_usage: float  # kv_tokens_used / kv_tokens_total
    tokens_per_s: float  # output tokens per second over the last few seconds
    prompt_tokens_total: int  # since start
    generated_tokens_total: int
    requests_total: int
    steps_total: int
    kv_resident_bytes: int = 0  # of the KV cache, resident now (grows with use, given back)
    memory_bytes: int = 0  # what the engine holds: weights_bytes + kv_resident_bytes
    # why the queue head waits: "slot" (every slot taken), "kv_tokens" (the pool lacks room for
    # its prompt + max_tokens), or "" (nobody waits, or only for the next step)
    queue_waiting_for: str = ""
    # speculative decoding since start: draft tokens verified, and those accepted
    spec_draft_tokens_total: int = 0
    spec_accepted_tokens_total: int = 0
    spec_acceptance: float = 0.0  # accepted / drafted (0 before any draft, or when off)
    # prefix caching since start: requests that started from a cached prefix, and its tokens
    prefix_cache_hits_total: int = 0
    prefix_cache_hit_tokens_total: int = 0
