"""What the engine is asked to do (`EngineRequest`) and what it knows about a request while it
runs (`RequestState`).

The gateway validates and clamps every field before it builds an `EngineRequest`; the engine
trusts them (STYLE.md, "Only validated requests reach the engine"). Requests cross the socket to
an engine server, hence msgspec Structs in the compact internal-message form: new fields go last,
with defaults, so old and new peers still understand each other.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import msgspec


class SamplingParams(msgspec.Struct, frozen=True, array_like=True, omit_defaults=True, gc=False):
    """How each next token is picked (consumed by the sampler, never by the scheduler)."""

    temperature: float = 1.0  # 0 selects greedy decoding
    top_k: int = 0  # keep the k most likely tokens; 0 keeps all
    top_p: float = 1.0  # nucleus: smallest set whose probability reaches top_p
    min_p: float = 0.0  # drop tokens below min_p × the top token's probability
    repetition_penalty: float = 1.0  # CTRL-style, over prompt and output; 1 is off
    presence_penalty: float = 0.0  # OpenAI: subtracted once from each token already output
    frequency_penalty: float = 0.0  # OpenAI: subtracted per occurrence in the output
    seed: int | None = None  # a per-request generator, so batching never changes the output
    n: int = 1  # choices wanted for this prompt
    logprobs: int | None = None  # None: no logprobs; k: the chosen token's plus k alternatives


class EngineRequest(msgspec.Struct, frozen=True, array_like=True, omit_defaults=True, gc=False):
    """One generation: the prompt already tokenized, when to stop, how to sample."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    max_tokens: int  # output tokens at most; prompt + max_tokens is reserved in a KV slot
    stop_token_ids: tuple[int, ...] = ()  # e.g. EOS; the stop token is output, then it ends
    sampling: SamplingParams = msgspec.field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()  # stop strings: the text ends before the first one, which is cut


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued, holds no slot
    RUNNING = "running"  # holds a slot; prefilling or decoding
    FINISHED = "finished"  # slot freed; finish_reason says why


class FinishReason(enum.StrEnum):
    # values are OpenAI's finish_reason strings where one exists
    STOP = "stop"  # a stop token was sampled
    LENGTH = "length"  # max_tokens reached
    ABORT = "abort"  # cancelled by the client or the gateway


@dataclass(slots=True, eq=False)
class RequestState:
    """The scheduler's mutable record of one request.

    Tokens are prompt + output; `num_computed_tokens` of them are in the KV cache. A step that
    brings `num_computed_tokens` up to `num_tokens` samples one new token.
    """

    request: EngineRequest
    arrival_time: float  # clock seconds when the scheduler accepted it (queue-time metrics)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0
    output_token_ids: list[int] = field(default_factory=list)
    slot: int | None = None
    finish_reason: FinishReason | None = None

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.request.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return self.num_prompt_tokens + len(self.output_token_ids)

    def token_ids(self, start: int, stop: int) -> tuple[int, ...]:
        """Tokens [start, stop) of prompt + output, without concatenating the whole sequence."""
        prompt, p = self.request.prompt_token_ids, self.num_prompt_tokens
        if stop <= p:
            return prompt[start:stop]
        return prompt[start:] + tuple(self.output_token_ids[max(start - p, 0) : stop - p])
