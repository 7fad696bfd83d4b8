"""The engine's closed set of errors.

`EngineError` and its subclasses are per-request and recoverable: the engine keeps serving the
other requests. `EngineDead` is not an `EngineError` on purpose, so that nobody catches a dead
engine as if it were one failed request. The gateway maps each type to one HTTP status in one
place; every message carries the value given and the limit it broke.
"""

from __future__ import annotations


class EngineError(Exception):
    """One request failed; the engine is healthy."""


class Overloaded(EngineError):
    """The waiting queue is full. Retrying after `retry_after_s` may succeed."""

    def __init__(self, queue_depth: int, max_waiting: int, retry_after_s: float):
        self.queue_depth, self.max_waiting, self.retry_after_s = (
            queue_depth,
            max_waiting,
            retry_after_s,
        )
        super().__init__(
            f"engine overloaded: {queue_depth} requests waiting, the limit is {max_waiting}; "
            f"retry after {retry_after_s:g} s"
        )


class ContextOverflow(EngineError):
    """prompt + max_tokens cannot fit one KV slot. Retrying the same request never helps."""

    def __init__(self, prompt_tokens: int, max_tokens: int, max_len: int):
        self.prompt_tokens, self.max_tokens, self.max_len = prompt_tokens, max_tokens, max_len
        super().__init__(
            f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) = "
            f"{prompt_tokens + max_tokens} tokens, more than the {max_len} a sequence slot holds"
        )


class InvalidRequest(EngineError):
    """A request the gateway should have rejected (empty prompt, max_tokens < 1, a request id
    already in the engine). Checked again because the scheduler cannot make progress on it."""


class EngineDead(Exception):
    """The engine cannot serve any more (the runtime crashed or the step loop died)."""
