"""Prefix caching: a finished request's slot keeps its cached positions while no request needs
the slot, and a new request whose prompt starts with the same tokens copies them instead of
computing them again (a shared system prompt, a chat's earlier turns).

Plain data, no runtime: the scheduler decides, the runner copies rows (`StepRunner.copy`).

    slot 0  [ running "a" ....... ]   running requests stay in the lowest slots (compaction)
    slot 1  [ running "b" ... ]
    slot 2  [ cached  "x": 600 tokens  ]  ◄─ "y" arrives with x's first 540 tokens:
    slot 3  [ cached  "z" ..... ]            copy slot 2's 540 positions to y's slot, prefill
    slot 4  [ free ]                         only the rest; slot 2 stays cached
                ▲ a cached slot is held in KVSlots under the finished request's id, so nothing
                  is allocated over it; the least recently used one is evicted (freed, its
                  memory released) when a request needs a slot or the pool's tokens

A source may also be a running request: its prompt's computed positions are stable (a step
only writes at and after `num_computed_tokens`), so requests that share a system prompt and
arrive together copy it from whichever computed it first. At least one prompt token is always
left to compute: its logits give the first output token.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from engine.kv_cache import KVSlots
from engine.request import RequestState

# The shortest prefix worth a copy: below it, recomputing costs about what copying does (a copy
# is ~46 KB a token for SmolLM2-135M, while a prompt forward's fixed cost dominates short chunks)
PREFIX_MIN_TOKENS = 32


@dataclass(slots=True)
class CachedPrefix:
    slot: int
    tokens: tuple[int, ...]  # the positions cached in the slot (KVSlots reserves as many)


@dataclass(frozen=True, slots=True)
class PrefixHit:
    """A new request's first `n_tokens` prompt tokens are in `slot` (cached or running); when
    that is the slot the request was given (an entry taken over in place), nothing is copied."""

    slot: int
    n_tokens: int
    key: str | None  # the cached entry it came from; None for a running request's prompt


@dataclass(frozen=True, slots=True)
class Admission:
    """Where a waiting request starts: `slot`, with its first `start` prompt tokens there once
    `copies` ((src, dst, n_tokens), in order) have run; `keep`: slots whose queued release must
    be dropped, their tokens being used."""

    slot: int
    start: int = 0
    copies: tuple[tuple[int, int, int], ...] = ()
    keep: tuple[int, ...] = ()


def common_prefix(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    """len of the common prefix of a and b, at most `limit`: a binary search over slice
    comparisons, each done in C, rather than a Python loop over tokens."""
    lo, hi = 0, min(len(a), len(b), limit)
    if hi and a[:hi] == b[:hi]:
        return hi
    while lo < hi:  # invariant: a[:lo] == b[:lo], a[:hi + 1] != b[:hi + 1] (or hi is the cap)
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class PrefixCache:
    """The cached slots, least recently used first, keyed by the id of the request that filled
    each (the id KVSlots holds the slot under)."""

    def __init__(self, min_tokens: int = PREFIX_MIN_TOKENS):
        if min_tokens < 1:
            raise ValueError(f"PrefixCache.min_tokens = {min_tokens} must be >= 1")
        self.min_tokens = min_tokens
        self._entries: OrderedDict[str, CachedPrefix] = OrderedDict()
        # entries a request admitted this step reads from: not evicted before the copy runs
        self._pinned: set[str] = set()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def keep(self, kv: KVSlots, key: str, slot: int, tokens: tuple[int, ...]) -> None:
        """Cache the slot a finished request `key` has just freed in `kv`, when it holds enough
        tokens to be worth a copy: the slot is taken again under `key`, reserving only the
        tokens it holds. KVSlots hands out the lowest free slot, which is this one when the
        running slots are compact (the steady state); else it is not cached. Its queued release
        is dropped by `held()`."""
        if len(tokens) < self.min_tokens:
            return
        again = kv.allocate(key, len(tokens))
        if again == slot:
            self._entries[key] = CachedPrefix(slot, tokens)
        elif again is not None:
            kv.free(key)

    def held(self, released: Sequence[int]) -> tuple[int, ...]:
        """`released` without the slots entries hold (cached since they were freed)."""
        slots = self.slots()
        return tuple(slot for slot in released if slot not in slots)

    def evict(self, kv: KVSlots, key: str) -> None:
        """Drop an entry and free its slot (KVSlots queues it for release)."""
        del self._entries[key]
        kv.free(key)

    def new_step(self) -> None:
        """A new step: the last one's copies have run."""
        self._pinned.clear()

    def lru(self, spare: str | None = None) -> str | None:
        """The least recently used entry other than `spare` and those read this step, or None."""
        return next(
            (key for key in self._entries if key != spare and key not in self._pinned), None
        )

    def below(self, slot: int) -> list[str]:
        """Entries in slots lower than `slot`."""
        return [key for key, e in self._entries.items() if e.slot < slot]

    def slots(self) -> set[int]:
        return {e.slot for e in self._entries.values()}

    def match(
        self, prompt: Sequence[int], running: Iterable[tuple[int, Sequence[int]]]
    ) -> PrefixHit | None:
        """The longest prefix of `prompt` (at least min_tokens, at most all but its last
        token) cached in an entry or computed in a running request's slot (`running`: (slot,
        its computed prompt tokens)). The entry it came from becomes the most recently used."""
        limit = len(prompt) - 1
        if limit < self.min_tokens:
            return None
        head = tuple(prompt[: self.min_tokens])
        best: PrefixHit | None = None
        for key, entry in self._entries.items():
            if entry.tokens[: self.min_tokens] == head:
                n = common_prefix(prompt, entry.tokens, limit)
                if best is None or n > best.n_tokens:
                    best = PrefixHit(entry.slot, n, key)
        for slot, tokens in running:
            if tuple(tokens[: self.min_tokens]) == head:
                n = common_prefix(prompt, tokens, limit)
                if best is None or n > best.n_tokens:
                    best = PrefixHit(slot, n, None)
        if best is None:
            return None
        if best.key is not None:
            self._entries.move_to_end(best.key)
        return best

    # ── what the scheduler asks, over its KVSlots ──

    def allocate(
        self, kv: KVSlots, state: RequestState, needed: int, running: Sequence[RequestState]
    ) -> Admission | None:
        """A slot for a waiting request, evicting least recently used entries while that makes
        room (never the one its prefix comes from, unless nothing else is left: then the prefix
        is computed instead), and where its prompt's prefix is cached; None: it waits.

        The request never sits above an entry: a decode forward would compute the entry as an
        idle row. Given a slot above one, it takes the lowest entry's slot instead and the entry
        moves up to the slot it was given (a copy of the entry's tokens)."""
        rid = state.request_id
        if rid in self._entries:  # a new request reusing a finished one's id
            self.evict(kv, rid)
        computed = ((s.slot, s.request.prompt_token_ids[: s.num_computed_tokens]) for s in running)
        hit = self.match(state.request.prompt_token_ids, computed)
        slot = kv.allocate(rid, needed)
        if slot is None:
            usage = kv.usage()
            cached = sum(len(e.tokens) for e in self._entries.values())
            if usage.tokens_reserved - cached + needed > usage.token_capacity:
                return None  # running requests hold the pool: evicting cannot help
        while slot is None:
            victim = self.lru(spare=hit.key if hit else None)
            if victim is not None:
                self.evict(kv, victim)
                slot = kv.allocate(rid, needed)
                continue
            if hit is None or hit.key is None or hit.key in self._pinned:
                return None  # every slot runs a request, or is read this step
            # only the source is left: the request takes its slot over in place when it is the
            # one handed out, else computes its prompt
            self.evict(kv, hit.key)
            slot = kv.allocate(rid, needed)
            if slot is None:
                return None
            if slot != hit.slot:
                hit = None
            elif not self._entries or min(self.slots()) > slot:
                return Admission(slot, hit.n_tokens, keep=(slot,))
            else:  # no swap: the entry below would overwrite the prefix this slot holds
                return Admission(slot)
        copies: list[tuple[int, int, int]] = []
        keep: list[int] = []
        below = [(e.slot, key) for key, e in self._entries.items() if e.slot < slot]
        if below:
            low, key = min(below)
            entry = self._entries[key]
            kv.free(key)
            kv.free(rid)  # the lowest free slots are now `low`, then `slot`
            taken = kv.allocate(rid, needed), kv.allocate(key, len(entry.tokens))
            assert taken == (low, slot), (taken, low, slot)
            copies.append((low, slot, len(entry.tokens)))
            entry.slot, slot = slot, low
            keep.append(low)
            if hit is not None and hit.slot == low:  # its source was that entry: in place
                hit = PrefixHit(low, hit.n_tokens, hit.key)
        if hit is None:
            return Admission(slot, 0, tuple(copies), tuple(keep))
        if hit.key is not None:
            self._pinned.add(hit.key)
        if hit.slot == slot:
            keep.append(slot)
        else:
            copies.append((hit.slot, slot, hit.n_tokens))
        return Admission(slot, hit.n_tokens, tuple(copies), tuple(dict.fromkeys(keep)))

    def compact(
        self, kv: KVSlots, running: Sequence[RequestState]
    ) -> list[tuple[RequestState, int, int]]:
        """Keeps the running requests in the lowest slots with the entries above them: entries
        below the highest running slot are evicted (a decode forward would compute them as idle
        rows every step, while an entry saves one prefill at most), then the highest running
        requests move down into the holes. Returns (state, from, to) per move; the caller
        updates `state.slot` and the runner copies the rows.

        A move frees the request's slot and allocates again (KVSlots hands out the lowest free
        slot, the hole): KVSlots.compact would move the highest *held* slot, an entry."""
        if not running:
            return []
        top = max(s.slot for s in running)
        for key in self.below(top):
            self.evict(kv, key)
        moves: list[tuple[RequestState, int, int]] = []
        by_slot = sorted(running, key=lambda s: s.slot)
        while by_slot and by_slot[-1].slot != len(by_slot) - 1:  # a hole below the top
            state = by_slot.pop()
            src = state.slot
            needed = state.num_prompt_tokens + state.request.max_tokens
            kv.free(state.request_id)
            dst = kv.allocate(state.request_id, needed)
            assert dst is not None and dst < src, (src, dst)
            moves.append((state, src, dst))
            state.slot = dst
            by_slot.append(state)
            by_slot.sort(key=lambda s: s.slot)
        return moves
