"""Output processing: each request's new tokens → the events its caller's stream receives.

The core's step is schedule → execute → sample → update (engine/core.py); what happens next is
this unit's, request by request: detokenisation (UTF-8-safe, incremental), stop strings,
logprobs, the n > 1 fan-out back to the caller's id and choice index, and timings. vLLM v1 draws
the same line between its `EngineCore.step` and its `OutputProcessor`.

A failure stays as small as its cause. Each request's output is handled under its own
try/except: an exception ends that request, every choice of it, with an error event
(`finish_reason` "error", `error` saying what failed) and aborts it in the scheduler, so its
slots free at the next step while the other requests keep streaming. Only the step itself
failing (the forward, the scheduler's invariants) ends the engine.

n > 1 choices become n scheduler requests `<id>/<i>` (`fan_out`) that batch like any others;
their events carry the caller's id and the choice's index.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import msgspec

from engine.detokenizer import IncrementalDecoder, StopMatcher, TokenBytes
from engine.outputs import RequestOutput, Timings, TokenLogprob
from engine.request import EngineRequest, RequestState
from engine.sampler import SampleResult
from engine.scheduler import ScheduledChunk

log = logging.getLogger(__name__)


def fan_out(request: EngineRequest) -> list[EngineRequest]:
    """The scheduler's requests for one caller's request: itself, or one per choice."""
    n = request.sampling.n
    if n == 1:
        return [request]
    rid = request.request_id
    return [msgspec.structs.replace(request, request_id=f"{rid}/{i}") for i in range(n)]


@dataclass(eq=False)
class _Choice:
    """What turns one choice's tokens into events."""

    parent: str  # the caller's request id
    index: int
    request: EngineRequest  # the scheduler's request (its id is `<parent>/<index>` when n > 1)
    decoder: IncrementalDecoder
    stops: StopMatcher
    accepted: float
    scheduled: float | None = None  # when the first step it ran in started
    token_times: list[float] = field(default_factory=list)


class OutputProcessor:
    def __init__(
        self,
        token_bytes: TokenBytes,
        abort: Callable[[str], object],  # the scheduler's: frees a request's slot next step
        clock: Callable[[], float],
    ):
        self.token_bytes = token_bytes
        self._abort, self._clock = abort, clock
        self._choices: dict[str, _Choice] = {}  # by scheduler id
        self._children: dict[str, list[str]] = {}  # caller id → scheduler ids

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._children

    def children(self, request_id: str) -> list[str] | None:
        """The scheduler ids of a caller's unfinished request; None if it is not here."""
        return self._children.get(request_id)

    def new_decoder(self, request: EngineRequest) -> IncrementalDecoder:
        """The detokeniser of one choice (the seam where a test puts a failing one)."""
        return IncrementalDecoder(self.token_bytes)

    def add(self, parent: EngineRequest, choices: Sequence[EngineRequest], accepted: float) -> None:
        """Follow a request the scheduler admitted as `choices` (from `fan_out(parent)`)."""
        ids = [c.request_id for c in choices]
        for i, choice in enumerate(choices):
            self._choices[choice.request_id] = _Choice(
                parent=parent.request_id,
                index=i,
                request=choice,
                decoder=self.new_decoder(choice),
                stops=StopMatcher(parent.stop),
                accepted=accepted,
            )
        self._children[parent.request_id] = ids

    def scheduled(self, chunks: Sequence[ScheduledChunk], started: float) -> None:
        """Note when each request first ran (its queue time)."""
        for chunk in chunks:
            choice = self._choices.get(chunk.request_id)
            if choice is not None and choice.scheduled is None:
                choice.scheduled = started

    def process(
        self,
        aborted: Sequence[str],
        updated: Sequence[RequestState],
        sampled: SampleResult | None,
        rows: Sequence[str],
        now: float,
    ) -> list[RequestOutput]:
        """One step's events: a final "abort" event for each request aborted since the last
        step, one event per token gained by a request (`updated`, from the scheduler: one token,
        or several from a verified draft), and an "error" event for every choice of a request
        whose output handling raised. `sampled` and `rows` (the scheduler ids of its rows, a
        request's rows consecutive, one per token it gained) give the logprobs."""
        outputs: list[RequestOutput] = []
        for cid in aborted:
            choice = self._choices.get(cid)
            if choice is None:
                continue  # finished, or ended by an error, before the abort reached the step
            try:
                outputs.append(self._final(choice, (), "", None, "abort"))
            except Exception as e:
                self._fail(choice, e, outputs)
        row_of: dict[str, int] | None = None  # built only when some request wants logprobs
        for state in updated:
            choice = self._choices.get(state.request_id)
            if choice is None:
                continue  # its request was ended earlier in this step (a sibling failed)
            try:
                first = None  # its first row, when it wants logprobs
                if choice.request.sampling.logprobs is not None and sampled is not None:
                    if row_of is None:
                        row_of = first_rows(rows)
                    first = row_of[state.request_id]
                outputs += self._emit_new(choice, state, sampled, first, now)
            except Exception as e:
                self._fail(choice, e, outputs)
        return outputs

    # ── internals ──

    def _emit_new(
        self,
        choice: _Choice,
        state: RequestState,
        sampled: SampleResult | None,
        first: int | None,
        now: float,
    ) -> list[RequestOutput]:
        """One event per token the step added (one, or several from a verified draft), until
        one ends the choice; `first`: the row of the first one's logprobs, None for none."""
        out: list[RequestOutput] = []
        tokens = state.output_token_ids
        new = len(tokens) - len(choice.token_times)
        for i in range(new):
            token = tokens[i - new]
            logprob = None if first is None else _logprob(sampled, first + i, token)
            out.append(self._emit(choice, state, token, logprob, now, finishing=i == new - 1))
            if out[-1].finished:
                break
        return out

    def _emit(
        self,
        choice: _Choice,
        state: RequestState,
        token: int,
        logprob: TokenLogprob | None,
        now: float,
        finishing: bool = True,
    ) -> RequestOutput:
        """The event of one token; `finishing` false for a token before the last a step added
        (the request's finish_reason is about its last token)."""
        choice.token_times.append(now)
        if finishing and state.finish_reason is not None:
            # a stop token ends the text without adding to it
            stop_token = token in choice.request.stop_token_ids
            text = "" if stop_token else choice.stops.push(choice.decoder.push(token))
            reason = "stop" if choice.stops.stopped else state.finish_reason.value
            return self._final(choice, (token,), text, logprob, reason)
        text = choice.stops.push(choice.decoder.push(token))
        if choice.stops.stopped:  # a stop string: done now, the slot frees next step
            self._abort(state.request_id)
            return self._final(choice, (token,), text, logprob, "stop")
        return RequestOutput(
            request_id=choice.parent,
            index=choice.index,
            text=text,
            token_ids=(token,),
            logprobs=None if logprob is None else (logprob,),
            prompt_tokens=len(choice.request.prompt_token_ids),
            completion_tokens=len(choice.token_times),
        )

    def _final(
        self,
        choice: _Choice,
        tokens: tuple[int, ...],
        text: str,
        logprob: TokenLogprob | None,
        reason: str,
    ) -> RequestOutput:
        """The last event of a choice: flushes held text, counts, timings; forgets the choice."""
        if reason != "stop" or not choice.stops.stopped:
            text += choice.stops.push(choice.decoder.flush())
            text += choice.stops.flush()
        end = self._clock()
        times = choice.token_times
        timings = Timings(
            queue_s=(choice.scheduled if choice.scheduled is not None else end) - choice.accepted,
            ttft_s=(times[0] if times else end) - choice.accepted,
            e2e_s=end - choice.accepted,
            itl_s=tuple(b - a for a, b in zip(times, times[1:], strict=False)),
        )
        out = RequestOutput(
            request_id=choice.parent,
            index=choice.index,
            text=text,
            token_ids=tokens,
            logprobs=None if logprob is None else (logprob,),
            finish_reason=reason,
            prompt_tokens=len(choice.request.prompt_token_ids),
            completion_tokens=len(times),
            timings=timings,
        )
        self._forget(choice)
        return out

    def _fail(self, choice: _Choice, error: Exception, outputs: list[RequestOutput]) -> None:
        """End every unfinished choice of `choice`'s request with an error event and abort
        them in the scheduler; the caller's stream ends, the other requests go on."""
        log.error(
            "request %r: handling its output failed; ending it", choice.parent, exc_info=error
        )
        message = f"output handling failed: {type(error).__name__}: {error}"
        for cid in self._children.pop(choice.parent, ()):
            sibling = self._choices.pop(cid, None)
            if sibling is None:
                continue  # this choice had already finished
            self._abort(cid)
            outputs.append(
                RequestOutput(
                    request_id=sibling.parent,
                    index=sibling.index,
                    finish_reason="error",
                    prompt_tokens=len(sibling.request.prompt_token_ids),
                    completion_tokens=len(sibling.token_times),
                    error=message,
                )
            )

    def _forget(self, choice: _Choice) -> None:
        del self._choices[choice.request.request_id]
        siblings = self._children[choice.parent]
        if not any(cid in self._choices for cid in siblings):
            del self._children[choice.parent]


def first_rows(rows: Sequence[str]) -> dict[str, int]:
    """Each scheduler id → its first row (a verified draft has several, consecutive)."""
    first: dict[str, int] = {}
    for i, cid in enumerate(rows):
        first.setdefault(cid, i)
    return first


def _logprob(sampled: SampleResult, row: int, token: int) -> TokenLogprob:
    top = sampled.top_logprobs[row]
    alternatives = () if top is None else tuple(zip(top[0].tolist(), top[1].tolist(), strict=True))
    return TokenLogprob(token_id=token, logprob=float(sampled.logprobs[row]), top=alternatives)
