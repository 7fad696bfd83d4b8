"""One engine step: schedule → run the graph → sample → update → stream text.

`EngineCore` is synchronous and single-threaded in its state; `engine.async_engine` drives it
from a thread of its own. A step is split in three so that the runtime call, the long part, runs
without the lock that guards the scheduler (ONNX Runtime releases the GIL while it computes):

    with lock: plan = core.plan()          # schedule(): who runs how many tokens
    logits = core.execute(plan)            # the graph; submit() and abort() may run meanwhile
    with lock: outputs = core.finish(plan, logits)

n > 1 choices become n requests `<id>/<i>` with their own generators (seed, i), so each choice
is reproducible on its own and they batch like any other requests.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec
import numpy as np

from engine.detokenizer import IncrementalDecoder, StopMatcher, TokenBytes
from engine.errors import InvalidRequest, Overloaded
from engine.outputs import RequestOutput, Timings, TokenLogprob
from engine.request import EngineRequest, RequestState
from engine.runner import StepRunner
from engine.sampler import Sampler, make_generator
from engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput

THROUGHPUT_WINDOW_S = 5.0  # stats(): output tokens per second over this trailing window


@dataclass(eq=False)
class _Choice:
    """The engine's side of one choice: everything that turns its tokens into events."""

    parent: str  # the caller's request id
    index: int
    request: EngineRequest
    generator: np.random.Generator
    decoder: IncrementalDecoder
    stops: StopMatcher
    accepted: float
    scheduled: float | None = None  # first step it ran in
    token_times: list[float] = field(default_factory=list)
    done: bool = False


@dataclass(frozen=True)
class Plan:
    step: SchedulerOutput
    started: float


class EngineCore:
    def __init__(
        self,
        runner: StepRunner,
        config: SchedulerConfig,
        token_bytes: TokenBytes,
        clock: Callable[[], float] = time.monotonic,
    ):
        if config.max_len > runner.max_len or config.n_slots > runner.n_slots:
            raise ValueError(
                f"scheduler n_slots={config.n_slots}, max_len={config.max_len} exceed the "
                f"runner's cache ({runner.n_slots} slots × {runner.max_len} tokens)"
            )
        if config.compact_slots and not runner.can_move:
            raise ValueError(
                f"compact_slots needs a host cache; {runner.provider} keeps it on the device"
            )
        self.runner, self.config = runner, config
        self.scheduler = Scheduler(config, clock)
        self.sampler = Sampler()
        self.token_bytes = token_bytes
        self._clock = clock
        self._choices: dict[str, _Choice] = {}  # by internal (scheduler) id
        self._children: dict[str, list[str]] = {}  # caller id → internal ids
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) per step
        self.prompt_tokens_total = self.generated_tokens_total = 0
        self.requests_total = self.steps_total = 0

    # ── requests in and out ──

    def add(self, request: EngineRequest) -> None:
        """Admit a request (all its choices) or raise Overloaded / ContextOverflow /
        InvalidRequest without side effects."""
        rid, n = request.request_id, request.sampling.n
        if rid in self._children:
            raise InvalidRequest(f"request id {rid!r} is already in the engine")
        if n < 1:
            raise InvalidRequest(f"request {rid!r}: n = {n} must be >= 1")
        free = self.config.max_waiting - self.scheduler.num_waiting
        if n > free:
            raise Overloaded(
                self.scheduler.num_waiting, self.config.max_waiting, self.config.retry_after_s
            )
        ids = [rid] if n == 1 else [f"{rid}/{i}" for i in range(n)]
        added: list[str] = []
        try:
            for i, cid in enumerate(ids):
                child = request if n == 1 else _with_id(request, cid)
                self.scheduler.add(child)
                added.append(cid)
                self._choices[cid] = _Choice(
                    parent=rid,
                    index=i,
                    request=child,
                    generator=make_generator(request.sampling.seed, i),
                    decoder=IncrementalDecoder(self.token_bytes),
                    stops=StopMatcher(request.stop),
                    accepted=self._clock(),
                )
        except Exception:
            for cid in added:  # all or nothing; never scheduled, so removal is immediate
                self.scheduler.abort(cid)
                self._choices.pop(cid)
            raise
        self._children[rid] = ids
        self.requests_total += 1
        self.prompt_tokens_total += len(request.prompt_token_ids) * n

    def abort(self, request_id: str) -> bool:
        """Cancel every choice of a request; its slots free at the next step boundary."""
        ids = self._children.get(request_id)
        if ids is None:
            return False
        for cid in ids:
            self.scheduler.abort(cid)
        return True

    def has_work(self) -> bool:
        return self.scheduler.has_unfinished()

    # ── one step ──

    def plan(self) -> Plan:
        return Plan(self.scheduler.schedule(), self._clock())

    def execute(self, plan: Plan) -> tuple[list[str], np.ndarray]:
        return self.runner.execute(plan.step)

    def finish(self, plan: Plan, ran: tuple[list[str], np.ndarray]) -> list[RequestOutput]:
        """Sample, update the scheduler, and turn new tokens into events."""
        step, outputs = plan.step, []
        self.steps_total += 1
        for cid in step.aborted:
            choice = self._choices.get(cid)
            if choice is not None and not choice.done:
                outputs.append(self._final(choice, [], "", None, "abort"))
        for chunk in step.chunks:
            choice = self._choices[chunk.request_id]
            if choice.scheduled is None:
                choice.scheduled = plan.started
        ids, logits = ran
        states = [self.scheduler.state(cid) for cid in ids]
        sampled: dict[str, int | None] = {c.request_id: None for c in step.chunks}
        result = None
        if ids:
            result = self.sampler.sample(
                logits,
                [s.request.sampling for s in states],
                [_History(s) for s in states],
                [s.num_prompt_tokens for s in states],
                [self._choices[cid].generator for cid in ids],
            )
            sampled.update(zip(ids, result.tokens.tolist(), strict=True))
        row = {cid: i for i, cid in enumerate(ids)}
        now = self._clock()
        for state in self.scheduler.update(sampled):
            choice = self._choices.get(state.request_id)
            if choice is None or choice.done:
                continue
            token = state.output_token_ids[-1]
            choice.token_times.append(now)
            logprob = None
            if choice.request.sampling.logprobs is not None and result is not None:
                logprob = _logprob(result, row[state.request_id], token)
            if state.finish_reason is not None:
                # a stop token ends the text without adding to it
                stop_token = token in choice.request.stop_token_ids
                text = "" if stop_token else choice.stops.push(choice.decoder.push(token))
                reason = "stop" if choice.stops.stopped else state.finish_reason.value
                outputs.append(self._final(choice, [token], text, logprob, reason))
                continue
            text = choice.stops.push(choice.decoder.push(token))
            if choice.stops.stopped:  # a stop string: done now, the slot frees next step
                self.scheduler.abort(state.request_id)
                outputs.append(self._final(choice, [token], text, logprob, "stop"))
                continue
            outputs.append(
                RequestOutput(
                    request_id=choice.parent,
                    index=choice.index,
                    text=text,
                    token_ids=(token,),
                    logprobs=None if logprob is None else (logprob,),
                    prompt_tokens=len(choice.request.prompt_token_ids),
                    completion_tokens=len(choice.token_times),
                )
            )
        produced = len(ids)
        self.generated_tokens_total += produced
        self._recent.append((now, produced))
        while self._recent and self._recent[0][0] < now - THROUGHPUT_WINDOW_S:
            self._recent.popleft()
        return outputs

    def step(self) -> list[RequestOutput]:
        """plan + execute + finish, for single-threaded callers (tests, `aimass generate`)."""
        plan = self.plan()
        return self.finish(plan, self.execute(plan))

    # ── stats ──

    def tokens_per_s(self) -> float:
        if len(self._recent) < 2:
            return 0.0
        span = self._recent[-1][0] - self._recent[0][0]
        tokens = sum(n for _, n in list(self._recent)[1:])
        return tokens / span if span > 0 else 0.0

    # ── internals ──

    def _final(
        self,
        choice: _Choice,
        tokens: list[int],
        text: str,
        logprob: TokenLogprob | None,
        reason: str,
    ) -> RequestOutput:
        """The last event of a choice: flushes held text, counts, timings; forgets the choice."""
        choice.done = True
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
        del self._choices[choice.request.request_id]
        siblings = self._children[choice.parent]
        if not any(cid in self._choices for cid in siblings):
            del self._children[choice.parent]
        return RequestOutput(
            request_id=choice.parent,
            index=choice.index,
            text=text,
            token_ids=tuple(tokens),
            logprobs=None if logprob is None else (logprob,),
            finish_reason=reason,
            prompt_tokens=len(choice.request.prompt_token_ids),
            completion_tokens=len(times),
            timings=timings,
        )


def _with_id(request: EngineRequest, request_id: str) -> EngineRequest:
    return msgspec.structs.replace(request, request_id=request_id)


def _logprob(result, row: int, token: int) -> TokenLogprob:
    top = result.top_logprobs[row]
    alternatives = () if top is None else tuple(zip(top[0].tolist(), top[1].tolist(), strict=True))
    return TokenLogprob(token_id=token, logprob=float(result.logprobs[row]), top=alternatives)


class _History:
    """prompt + output of a request, concatenated only if a penalty asks for it."""

    __slots__ = ("_state",)

    def __init__(self, state: RequestState):
        self._state = state

    def __len__(self) -> int:
        return self._state.num_tokens

    def __getitem__(self, index: slice) -> list[int]:
        s = self._state
        return (list(s.request.prompt_token_ids) + s.output_token_ids)[index]
