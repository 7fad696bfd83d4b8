"""Continuous batching: which requests run how many tokens in each step.

The scheduler returns plain data and imports no runtime; `engine/core.py` runs one step as
`schedule()` → runner → `update()`. It is not thread-safe: the step loop owns it, and `abort()`
from elsewhere must be handed to that loop.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

from engine.errors import InvalidRequest, Overloaded
from engine.kv_cache import KVSlots, KVUsage, check_fits
from engine.prefix_cache import PrefixCache
from engine.request import EngineRequest, FinishReason, RequestState, RequestStatus
from engine.speculative import Speculator


@dataclass(frozen=True)
class SchedulerConfig:
    """The scheduler's settings. The engine builds them from `engine.loader.EngineConfig`, the
    one settings type users give (its defaults are the only ones), once the artifact has fixed
    `max_len`; scheduler tests build them directly."""

    # sequences decoded together; each owns one preallocated KV row, so this sizes the cache
    n_slots: int
    # tokens per slot (prompt + output): the cache's time axis and the admission limit
    max_len: int
    # tokens computed per step across all requests; bounds a step's latency, hence the
    # inter-token gap every running stream sees while a long prompt is being prefilled
    token_budget: int
    # requests queued beyond the slots; a full queue answers Overloaded instead of growing
    # latency without bound
    max_waiting: int
    # the Retry-After hint Overloaded carries: roughly the time for a queued request to start
    retry_after_s: float
    # move running requests down into the slots finished ones left (those the waiting requests
    # will not take), so a decode forward covers only running slots; the runner copies the rows
    compact_slots: bool = True
    # the pool of positions the slots share (engine/kv_cache.py): a request is admitted only
    # while prompt + max_tokens fit what the running ones have not reserved; None: every slot
    # full (n_slots × max_len)
    kv_tokens: int | None = None
    # keep a finished request's cached positions while its slot is not needed, and start a new
    # request sharing its prompt's prefix from them (engine/prefix_cache.py)
    prefix_caching: bool = False
    # draft tokens a decoding request may carry, proposed from its own prompt and output and
    # verified in the same forward (engine/speculative.py); 0 turns speculation off
    speculative_tokens: int = 0
    # prompt tokens per step while any request decodes (0: what the budget leaves): a step's
    # prompt chunk delays every running stream's next token by its cost, so a small one keeps
    # their inter-token gap near its steady value while long prompts arrive; with nothing
    # decoding, prompts take the whole budget (no stream waits on them)
    max_prefill_tokens: int = 0

    def __post_init__(self) -> None:
        owner = "SchedulerConfig"
        check_limits(owner, self.n_slots, self.token_budget, self.max_waiting, self.retry_after_s)
        _at_least(owner, "max_len", self.max_len, 2, "a prompt token and an output token")
        check_kv_tokens(owner, self.kv_tokens, self.n_slots, self.max_len)
        _at_least(owner, "speculative_tokens", self.speculative_tokens, 0, "0 turns it off")
        _at_least(owner, "max_prefill_tokens", self.max_prefill_tokens, 0, "0 is no limit")


def check_limits(
    owner: str, n_slots: int, token_budget: int, max_waiting: int, retry_after_s: float
) -> None:
    """The scheduling rule's limits, for every settings type that carries them: a ValueError
    naming `owner`'s field, the value and the limit."""
    _at_least(owner, "n_slots", n_slots, 1, "one sequence")
    why = "n_slots: every running stream decodes one token per step"
    _at_least(owner, "token_budget", token_budget, n_slots, why)
    _at_least(owner, "max_waiting", max_waiting, 1, "one queued request")
    if not retry_after_s > 0:
        raise ValueError(f"{owner}.retry_after_s = {retry_after_s!r} must be > 0")


def check_kv_tokens(owner: str, kv_tokens: int | None, n_slots: int, max_len: int) -> None:
    """kv_tokens holds one longest request at least, and no more than every slot full."""
    if kv_tokens is None:
        return
    _at_least(owner, "kv_tokens", kv_tokens, max_len, "max_len: one request of the longest")
    if kv_tokens > n_slots * max_len:
        raise ValueError(
            f"{owner}.kv_tokens = {kv_tokens} must be <= n_slots × max_len = {n_slots * max_len} "
            f"({n_slots} × {max_len}: the slots hold no more)"
        )


def _at_least(owner: str, name: str, value: int, limit: int, why: str) -> None:
    if value < limit:
        raise ValueError(f"{owner}.{name} = {value!r} must be >= {limit} ({why})")


@dataclass(frozen=True, slots=True)
class ScheduledChunk:
    """Tokens one request runs this step: `token_ids` go to positions start .. start + n - 1 of
    `slot`; when `sample` is true the logits of the last one give the request's next token.
    A decode with a draft (`draft` > 0) ends with that many proposed tokens: the logits of its
    last 1 + draft positions verify them (engine/speculative.py)."""

    request_id: str
    slot: int
    start: int
    token_ids: tuple[int, ...]
    sample: bool
    draft: int = 0

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True, slots=True)
class SlotMove:
    """Before this step runs, the cache row of `src` moves to `dst` (its first `n_tokens`
    positions: what the request has computed so far); or, as a copy, `dst` starts with `src`'s
    first `n_tokens` positions, a prefix `src` keeps (prefix caching)."""

    request_id: str
    src: int
    dst: int
    n_tokens: int


@dataclass(frozen=True)
class SchedulerOutput:
    """One step, grouped by the shape of forward the runner needs on ONNX Runtime."""

    # the rule's result, {request_id: n_tokens}; what the runner must compute this step
    num_scheduled_tokens: dict[str, int]
    # one token on top of a past that samples, rows at different positions: one batched forward
    decodes: tuple[ScheduledChunk, ...]
    # the first chunk of a prompt (no past): one batched, right-padded forward
    prefills: tuple[ScheduledChunk, ...]
    # several tokens on top of a past (a later prompt chunk, a prompt after its cached prefix,
    # a decode with a draft), or one prompt token that does not sample: ONNX Runtime's CPU
    # GroupQueryAttention runs each only at batch 1 (see schedule())
    continuations: tuple[ScheduledChunk, ...]
    # requests aborted since the last step; their slots are free again, the runner forgets them
    aborted: tuple[str, ...]
    # cache rows to move before the forwards (compaction); the chunks above use the new slots
    moves: tuple[SlotMove, ...] = ()
    # slots freed since the last step (finished or aborted): before anything else, the runner
    # gives their memory back (StepRunner.release); one may be taken again in this very step
    released: tuple[int, ...] = ()
    # cached prefixes copied after the moves, before the forwards (prefix caching)
    copies: tuple[SlotMove, ...] = ()

    @property
    def total_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values())

    @property
    def chunks(self) -> tuple[ScheduledChunk, ...]:
        return self.decodes + self.prefills + self.continuations


class Scheduler:
    def __init__(self, config: SchedulerConfig, clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.kv = KVSlots(config.n_slots, config.max_len, config.kv_tokens)
        self._waiting_for: str | None = None  # why the queue head did not start last step
        self._clock = clock
        self._waiting: deque[RequestState] = deque()  # FIFO, holds no slot
        self._running: list[RequestState] = []  # admission order, each holds a slot
        self._states: dict[str, RequestState] = {}  # waiting + running
        self._aborts: dict[str, None] = {}  # an ordered set: applied at the next step boundary
        self._in_flight: dict[str, ScheduledChunk] | None = None  # scheduled, not yet updated
        self.prefix = PrefixCache() if config.prefix_caching else None
        self.prefix_hits = self.prefix_hit_tokens = 0  # requests that copied a prefix, tokens
        k = config.speculative_tokens
        self.speculator = Speculator(k) if k else None

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    def state(self, request_id: str) -> RequestState:
        """A waiting or running request's state (KeyError once it finished)."""
        return self._states[request_id]

    def has_unfinished(self) -> bool:
        return bool(self._states)

    def usage(self) -> KVUsage:
        waiting_for = self._waiting_for if self._waiting else None
        usage = replace(self.kv.usage(), waiting_for=waiting_for)
        if self.prefix:  # cached slots run nothing (their tokens stay reserved until evicted)
            usage = replace(usage, slots_used=usage.slots_used - len(self.prefix))
        return usage

    def add(self, request: EngineRequest) -> None:
        """Queue a request; ContextOverflow if it can never fit a slot, Overloaded if the queue
        is full (checked in that order: retrying an oversized request never helps)."""
        rid, prompt = request.request_id, len(request.prompt_token_ids)
        if rid in self._states:
            raise InvalidRequest(f"request id {rid!r} is already in the engine")
        if prompt < 1 or request.max_tokens < 1:
            raise InvalidRequest(
                f"request {rid!r}: prompt has {prompt} tokens and max_tokens is "
                f"{request.max_tokens}; both must be >= 1"
            )
        check_fits(prompt, request.max_tokens, self.config.max_len)
        if len(self._waiting) >= self.config.max_waiting:
            raise Overloaded(len(self._waiting), self.config.max_waiting, self.config.retry_after_s)
        state = RequestState(request, arrival_time=self._clock())
        self._waiting.append(state)
        self._states[rid] = state

    def abort(self, request_id: str) -> bool:
        """Cancel a waiting or running request; False if it is unknown or already finished.

        It never runs again: a token it samples in the step now in flight is dropped, and its
        slot is freed at the next step boundary (the start of the next schedule()), once the
        runner no longer writes into it."""
        if request_id not in self._states:
            return False
        self._aborts[request_id] = None
        return True

    def schedule(self) -> SchedulerOutput:
        """Decide the next step.

        The rule: one budget of `token_budget` tokens per step is handed out in this order.
        1. Every running request whose next input is a single token (a decode) gets 1 token.
           The budget covers them all (token_budget >= n_slots), so running streams never stall.
        2. The request still in its prompt, if any, gets min(tokens left, prompt budget), the
           prompt budget being what remains after the decodes, and while any request decodes
           at most `max_prefill_tokens` (when set): a step's prompt chunk runs before the
           streams' next tokens come out, so its size bounds their inter-token gap.
        3. Waiting requests are admitted in FIFO order while a slot, room in the KV pool for
           prompt + max_tokens (reserved until it finishes) and prompt budget remain, each
           with a first chunk of min(prompt, prompt budget left); else the queue head waits
           (`usage().waiting_for` says for what).
        Aborted requests leave at the step boundary, before the budget is handed out. Then the
        running requests in the highest slots move down into the holes finished ones left
        (`moves`), except the lowest holes, one per waiting request, which those take without a
        copy; so the slots in use stay contiguous from 0 and a decode forward computes no idle
        row (but for the one request part-way through its prompt).

        A chunk cut short has used up the prompt budget, so at most one request is ever part-way
        through its prompt, and a step runs at most one later chunk of it (several tokens on top
        of a past). That matters: ONNX Runtime's CPU GroupQueryAttention runs such a chunk only
        at batch 1, so each one costs the runner a forward of its own.

        With speculative decoding, a decode in 1. may also carry draft tokens (engine/
        speculative.py says when) out of the budget left after every decode's token; each such
        decode is a batch-1 forward too. With prefix caching, an admitted request whose prompt
        starts with tokens cached in another slot has them copied (`copies`) and its first chunk
        starts after them; cached slots sit above the running ones and the least recently used
        is evicted when a slot or pool tokens are needed (engine/prefix_cache.py), and the
        compaction fills every hole (waiting requests take the slots above).
        """
        if self._in_flight is not None:
            raise RuntimeError("schedule() called again before update() took the last step")
        aborted = self._apply_aborts()
        if self.prefix is not None:
            self.prefix.new_step()
        moves = self._compact() if self.config.compact_slots else ()
        budget = self.config.token_budget
        chunks: list[ScheduledChunk] = []

        decoding = [s for s in self._running if s.num_tokens - s.num_computed_tokens == 1]
        budget -= len(decoding)
        if self.speculator is None:
            for state in decoding:
                chunks.append(self._chunk(state, 1))
        else:
            drafts = self.speculator.drafts(decoding, budget)
            for state in decoding:
                draft = drafts.get(state.request_id, ())
                chunks.append(self._chunk(state, 1, draft))
                budget -= len(draft)

        cap = self.config.max_prefill_tokens
        prompts = min(budget, cap) if decoding and cap else budget  # the prompt budget
        budget -= prompts
        prefilling = [s for s in self._running if s.num_tokens - s.num_computed_tokens > 1]
        assert len(prefilling) <= 1, "two requests part-way through their prompts"
        if prefilling and prompts:
            state = prefilling[0]
            n = min(state.num_tokens - state.num_computed_tokens, prompts)
            chunks.append(self._chunk(state, n))
            prompts -= n

        self._waiting_for = None
        copies: list[SlotMove] = []
        in_place: list[int] = []  # slots whose tokens a request admitted now starts from
        while self._waiting and prompts > 0:
            state = self._waiting[0]
            request = state.request
            needed = state.num_prompt_tokens + request.max_tokens
            if self.prefix is None:
                slot = self.kv.allocate(state.request_id, needed)
            else:
                admission = self.prefix.allocate(self.kv, state, needed, self._running)
                slot = None if admission is None else admission.slot
                if admission is not None:
                    copies += (SlotMove(state.request_id, *c) for c in admission.copies)
                    in_place += admission.keep
                    state.num_computed_tokens = admission.start
                    self.prefix_hits += admission.start > 0
                    self.prefix_hit_tokens += admission.start
            if slot is None:
                # FIFO: nobody overtakes the head; it starts when a slot and tokens free
                self._waiting_for = self.kv.no_room(needed)
                break
            self._waiting.popleft()
            state.status, state.slot = RequestStatus.RUNNING, slot
            self._running.append(state)
            n = min(state.num_prompt_tokens - state.num_computed_tokens, prompts)
            chunks.append(self._chunk(state, n))
            prompts -= n

        assert budget >= 0 and prompts >= 0, (budget, prompts)
        self._in_flight = {c.request_id: c for c in chunks}
        # a one-token chunk of a prompt (the budget left beside the decodes) is a continuation,
        # not a decode: it samples nothing, and the runner returns logits for every decode
        return SchedulerOutput(
            num_scheduled_tokens={c.request_id: c.n_tokens for c in chunks},
            decodes=tuple(c for c in chunks if c.start > 0 and c.n_tokens == 1 and c.sample),
            prefills=tuple(c for c in chunks if c.start == 0),
            continuations=tuple(
                c for c in chunks if c.start > 0 and (c.n_tokens > 1 or not c.sample)
            ),
            aborted=aborted,
            moves=moves,
            released=self._released(moves, in_place),
            copies=tuple(copies),
        )

    def update(self, sampled: Mapping[str, int | Sequence[int] | None]) -> list[RequestState]:
        """Take the step's result, {request_id: sampled token, or None for a chunk that does
        not sample; for a decode with a draft, the tokens its verification emitted}. Returns the
        states that gained tokens, finished ones included (their finish_reason set and slot
        freed)."""
        if self._in_flight is None:
            raise RuntimeError("update() called without a scheduled step")
        in_flight, self._in_flight = self._in_flight, None
        unknown = sampled.keys() - in_flight.keys()
        if unknown:
            raise ValueError(f"tokens for requests not scheduled this step: {sorted(unknown)}")
        updated = []
        for rid, chunk in in_flight.items():
            if rid in self._aborts:
                continue  # dropped: the client asked to stop; freed at the next boundary
            state = self._states[rid]
            token = sampled.get(rid)
            if (token is None) == chunk.sample:
                raise ValueError(
                    f"request {rid!r}: sample={chunk.sample} this step but the runner gave "
                    f"token {token!r}"
                )
            if chunk.draft:
                self._take_verified(state, chunk, token)
                updated.append(state)
                continue
            state.num_computed_tokens += chunk.n_tokens
            if token is None:
                continue
            state.output_token_ids.append(token)
            if token in state.request.stop_token_ids:
                self._finish(state, FinishReason.STOP)
            elif len(state.output_token_ids) >= state.request.max_tokens:
                self._finish(state, FinishReason.LENGTH)
            updated.append(state)
        return updated

    def _take_verified(self, state: RequestState, chunk: ScheduledChunk, tokens: Sequence[int]):
        """A verified draft's emitted tokens (its accepted drafts, then the next token), up to a
        stop token or max_tokens. The last input and each accepted draft are now computed; the
        rejected positions past them are overwritten by later steps."""
        assert self.speculator is not None and 1 <= len(tokens) <= chunk.draft + 1, tokens
        self.speculator.verified(state.request_id, chunk.draft, len(tokens) - 1)
        request, output = state.request, state.output_token_ids
        for token in tokens:
            output.append(token)
            state.num_computed_tokens += 1
            if token in request.stop_token_ids:
                self._finish(state, FinishReason.STOP)
                return
            if len(output) >= request.max_tokens:
                self._finish(state, FinishReason.LENGTH)
                return

    def _chunk(self, state: RequestState, n: int, draft: tuple[int, ...] = ()) -> ScheduledChunk:
        start = state.num_computed_tokens
        assert state.slot is not None and n >= 1
        return ScheduledChunk(
            request_id=state.request_id,
            slot=state.slot,
            start=start,
            token_ids=state.token_ids(start, start + n) + draft,
            sample=start + n == state.num_tokens,
            draft=len(draft),
        )

    def _finish(self, state: RequestState, reason: FinishReason) -> None:
        rid = state.request_id
        if state.status is RequestStatus.WAITING:
            self._waiting.remove(state)
        else:
            self._running.remove(state)
            if self.speculator is not None:
                self.speculator.forget(rid)
            self.kv.free(rid)
            if self.prefix is not None:
                tokens = state.token_ids(0, state.num_computed_tokens)
                self.prefix.keep(self.kv, rid, state.slot, tokens)
        del self._states[rid]
        state.status, state.finish_reason, state.slot = RequestStatus.FINISHED, reason, None

    def _compact(self) -> tuple[SlotMove, ...]:
        if self.prefix is not None:
            return tuple(
                SlotMove(s.request_id, src, dst, s.num_computed_tokens)
                for s, src, dst in self.prefix.compact(self.kv, self._running)
            )
        moves = []
        # the lowest free slots are left to the waiting requests: they take them with no copy
        for rid, src, dst in self.kv.compact(reserve=len(self._waiting)):
            state = self._states[rid]
            state.slot = dst
            moves.append(SlotMove(rid, src, dst, state.num_computed_tokens))
        return tuple(moves)

    def take_released(self) -> tuple[int, ...]:
        """The slots freed since the last step whose positions nobody will read again (not kept
        as a cached prefix), for the runner to give their memory back right after update():
        an engine gone idle runs no next step to release them."""
        return self._released((), [])

    def _released(self, moves: tuple[SlotMove, ...], in_place: list[int]) -> tuple[int, ...]:
        released = self.kv.take_released()
        if self.prefix is None or not released:
            return released
        # prefix caching frees and allocates again what keeps its tokens: a finished request's
        # slot kept as an entry, an entry taken over in place, and a move's source (released by
        # the runner's move, after the copy)
        kept = {m.src for m in moves}.union(in_place)
        return tuple(slot for slot in self.prefix.held(released) if slot not in kept)

    def _apply_aborts(self) -> tuple[str, ...]:
        aborted = tuple(self._aborts)
        for rid in aborted:
            self._finish(self._states[rid], FinishReason.ABORT)
        self._aborts.clear()
        return aborted
