"""One engine step: schedule → execute → sample → update, then the output processor.

`EngineCore` is synchronous and single-threaded in its state; `engine.async_engine` drives it
from a thread of its own. A step is split in three so that the runtime call, the long part, runs
without the lock that guards the scheduler (ONNX Runtime releases the GIL while it computes):

    with lock: plan = core.plan()          # schedule(): who runs how many tokens
    ran = core.execute(plan)               # the graph; submit() and abort() may run meanwhile
    with lock: outputs = core.update(plan, ran)   # sample, update the scheduler, then events

An exception out of `plan`, `execute` or `update` is a runtime failure: the forward itself, the
sampler over the batch, or the scheduler's invariants. Turning one request's tokens into events
is the output processor's (engine/output_processor.py), which ends only that request when its
handling fails.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from engine.detokenizer import TokenBytes
from engine.errors import InvalidRequest, Overloaded
from engine.output_processor import OutputProcessor, fan_out, first_rows
from engine.outputs import RequestOutput
from engine.request import EngineRequest, RequestState
from engine.runner import StepRunner
from engine.sampler import Sampler, SampleResult, make_generator
from engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from engine.speculative import accepted_prefix

THROUGHPUT_WINDOW_S = 5.0  # stats(): output tokens per second over this trailing window


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
        if config.prefix_caching and not runner.can_move:
            raise ValueError(
                f"prefix_caching copies cache rows, which {runner.provider} keeps on the device"
            )
        self.runner, self.config = runner, config
        self.scheduler = Scheduler(config, clock)
        self.sampler = Sampler()
        self.output = OutputProcessor(token_bytes, self.scheduler.abort, clock)
        self._clock = clock
        # one generator per scheduler request for its whole life: batching never changes what
        # a seeded request samples
        self._generators: dict[str, np.random.Generator] = {}
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) per step
        self.prompt_tokens_total = self.generated_tokens_total = 0
        self.requests_total = self.steps_total = 0

    @property
    def token_bytes(self) -> TokenBytes:
        """token id → bytes, for callers that render tokens (logprobs) themselves."""
        return self.output.token_bytes

    # ── requests in and out ──

    def add(self, request: EngineRequest) -> None:
        """Admit a request (all its choices) or raise Overloaded / ContextOverflow /
        InvalidRequest without side effects."""
        rid, n = request.request_id, request.sampling.n
        if rid in self.output:
            raise InvalidRequest(f"request id {rid!r} is already in the engine")
        if n < 1:
            raise InvalidRequest(f"request {rid!r}: n = {n} must be >= 1")
        free = self.config.max_waiting - self.scheduler.num_waiting
        if n > free:
            raise Overloaded(
                self.scheduler.num_waiting, self.config.max_waiting, self.config.retry_after_s
            )
        choices = fan_out(request)
        added: list[str] = []
        try:
            for child in choices:
                self.scheduler.add(child)
                added.append(child.request_id)
        except Exception:
            for cid in added:  # all or nothing: they leave at the next step, never having run
                self.scheduler.abort(cid)
            raise
        for i, child in enumerate(choices):
            self._generators[child.request_id] = make_generator(request.sampling.seed, i)
        self.output.add(request, choices, self._clock())
        self.requests_total += 1
        self.prompt_tokens_total += len(request.prompt_token_ids) * n

    def abort(self, request_id: str) -> bool:
        """Cancel every choice of a request; its slots free at the next step boundary."""
        ids = self.output.children(request_id)
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

    def update(self, plan: Plan, ran: tuple[list[str], np.ndarray]) -> list[RequestOutput]:
        """Sample, update the scheduler, and hand the new tokens to the output processor."""
        step = plan.step
        self.steps_total += 1
        self.output.scheduled(step.chunks, plan.started)
        for cid in step.aborted:
            self._generators.pop(cid, None)
        ids, logits = ran
        sampled: dict[str, int | list[int] | None] = {c.request_id: None for c in step.chunks}
        result = None
        produced = len(ids)
        drafts = {c.request_id: c.token_ids[1:] for c in step.continuations if c.draft}
        if drafts:
            result, verified = self._verify(ids, logits, drafts)
            sampled.update(verified)
            # a request with a draft had 1 + len(draft) rows and emitted what was accepted + 1
            produced += sum(len(verified[cid]) - 1 - len(d) for cid, d in drafts.items())
        elif ids:
            states = [self.scheduler.state(cid) for cid in ids]
            result = self.sampler.sample(
                logits,
                [s.request.sampling for s in states],
                [_History(s) for s in states],
                [s.num_prompt_tokens for s in states],
                [self._generators[cid] for cid in ids],
            )
            sampled.update(zip(ids, result.tokens.tolist(), strict=True))
        updated = self.scheduler.update(sampled)
        # finished requests' slots give their cache memory back now, not at the next step,
        # which an engine that has gone idle never runs
        for slot in self.scheduler.take_released():
            self.runner.release(slot)
        for state in updated:
            if state.finish_reason is not None:
                del self._generators[state.request_id]
        now = self._clock()
        outputs = self.output.process(step.aborted, updated, result, ids, now)
        self.generated_tokens_total += produced
        self._recent.append((now, produced))
        while self._recent and self._recent[0][0] < now - THROUGHPUT_WINDOW_S:
            self._recent.popleft()
        return outputs

    def _verify(
        self, ids: list[str], logits: np.ndarray, drafts: dict[str, tuple[int, ...]]
    ) -> tuple[SampleResult, dict[str, int | list[int]]]:
        """Sample every row as a one-token decode would, then keep each draft's rows up to the
        first that disagrees (engine/speculative.py: this is the rejection rule for a one-hot
        draft). Row j of a request with a draft follows its draft's first j tokens; its
        generator ends up having drawn once per token emitted, as decoding them one at a time."""
        first = first_rows(ids)
        states = [self.scheduler.state(cid) for cid in ids]
        histories = [
            _History(s, drafts[cid][: i - first[cid]]) if cid in drafts else _History(s)
            for i, (cid, s) in enumerate(zip(ids, states, strict=True))
        ]
        gens = self._generators
        drawn = {cid: gens[cid].bit_generator.state for cid in drafts}
        result = self.sampler.sample(
            logits,
            [s.request.sampling for s in states],
            histories,
            [s.num_prompt_tokens for s in states],
            [gens[cid] for cid in ids],
        )
        tokens = result.tokens.tolist()
        verified: dict[str, int | list[int]] = {}
        for cid, row in first.items():
            draft = drafts.get(cid)
            if draft is None:
                verified[cid] = tokens[row]
                continue
            targets = tokens[row : row + len(draft) + 1]
            emitted = targets[: accepted_prefix(targets, draft) + 1]
            if self.scheduler.state(cid).request.sampling.temperature != 0:
                gens[cid].bit_generator.state = drawn[cid]  # one draw per emitted token
                gens[cid].random(len(emitted))
            verified[cid] = emitted
        return result, verified

    def step(self) -> list[RequestOutput]:
        """plan + execute + update, for single-threaded callers (tests, `aimass generate`)."""
        plan = self.plan()
        return self.update(plan, self.execute(plan))

    # ── stats ──

    def feature_stats(self) -> dict[str, int | float]:
        """EngineStats' speculative decoding and prefix caching counters."""
        spec, sched = self.scheduler.speculator, self.scheduler
        return {
            "spec_draft_tokens_total": spec.drafted_total if spec else 0,
            "spec_accepted_tokens_total": spec.accepted_total if spec else 0,
            "spec_acceptance": spec.acceptance if spec else 0.0,
            "prefix_cache_hits_total": sched.prefix_hits,
            "prefix_cache_hit_tokens_total": sched.prefix_hit_tokens,
        }

    def tokens_per_s(self) -> float:
        if len(self._recent) < 2:
            return 0.0
        span = self._recent[-1][0] - self._recent[0][0]
        tokens = sum(n for _, n in list(self._recent)[1:])
        return tokens / span if span > 0 else 0.0


class _History:
    """prompt + output of a request (+ the draft tokens a verified row follows), concatenated
    only if a penalty asks for it."""

    __slots__ = ("_state", "_extra")

    def __init__(self, state: RequestState, extra: tuple[int, ...] = ()):
        self._state, self._extra = state, extra

    def __len__(self) -> int:
        return self._state.num_tokens + len(self._extra)

    def __getitem__(self, index: slice) -> list[int]:
        s = self._state
        return (list(s.request.prompt_token_ids) + s.output_token_ids + list(self._extra))[index]
