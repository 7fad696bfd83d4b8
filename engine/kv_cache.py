"""Which request holds which KV slot, and how many of the pool's tokens.

The runner allocates the cache once and updates it in place (IO binding); this module owns only
the bookkeeping. One tensor per layer and per K/V, a fixed pool of slots, each a whole row of
`max_len` positions (ORT's CPU GroupQueryAttention has no paged layout, serving.md 3.2), of
which the host holds only the positions written (engine/kv_memory.py):

                  position 0 ..................................... max_len - 1
    cache[slot 0] | prompt "a" ....... | out "a" .. |  reserved  |  free       |
    cache[slot 1] |                      free slot                             |
    cache[slot 2] | prompt "b" .. | out "b" ....... |      reserved            |
                  ^--- num_computed_tokens ---^  (seqlens_k = num_computed - 1)
    shape per layer: (n_slots, n_kv, max_len, head_dim)

Capacity is a pool of `kv_tokens` positions shared by the slots, not n_slots × max_len: a
request is admitted only while the pool has room for its prompt + max_tokens, which it reserves
until it finishes, so a running request never runs out of room (no preemption) and the cache
never holds more than kv_tokens positions written for live requests. `max_len` stays the limit
of one request. "No room" is `None` from allocate(), and `no_room()` says which of the two ran
out. When a slot is freed its number is queued for `take_released()`: the runner gives its pages
back. The lowest free slot is handed
out first, and `compact()` moves requests down into the holes that finished ones leave: the
runner binds a contiguous range of slots per forward, and on a CPU every free slot inside that
range would be computed as a dummy row (a decode row costs as much as a real one there).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from engine.errors import ContextOverflow

# why the head of the queue waits (KVUsage.waiting_for, EngineStats.queue_waiting_for)
WAIT_SLOT = "slot"  # every slot holds a request
WAIT_KV_TOKENS = "kv_tokens"  # a slot is free, but the pool lacks room for prompt + max_tokens


def check_fits(prompt_tokens: int, max_tokens: int, max_len: int) -> None:
    """Admission: prompt + max_tokens must fit one slot; else ContextOverflow with the numbers."""
    if prompt_tokens + max_tokens > max_len:
        raise ContextOverflow(prompt_tokens, max_tokens, max_len)


@dataclass(frozen=True, slots=True)
class KVUsage:
    slots_used: int
    n_slots: int
    tokens_reserved: int  # sum of prompt + max_tokens over the requests holding a slot
    token_capacity: int  # the pool: kv_tokens (n_slots × max_len at most)
    waiting_for: str | None = None  # WAIT_SLOT / WAIT_KV_TOKENS, None when nobody waits

    @property
    def fraction(self) -> float:
        return self.tokens_reserved / self.token_capacity


class KVSlots:
    """`n_slots` sequence slots of `max_len` tokens each, sharing a pool of `kv_tokens`
    (default: every slot full)."""

    def __init__(self, n_slots: int, max_len: int, kv_tokens: int | None = None):
        if n_slots < 1 or max_len < 1:
            raise ValueError(f"n_slots={n_slots} and max_len={max_len} must both be >= 1")
        kv_tokens = n_slots * max_len if kv_tokens is None else kv_tokens
        if not max_len <= kv_tokens <= n_slots * max_len:
            raise ValueError(
                f"kv_tokens={kv_tokens} must be in max_len={max_len} .. n_slots × max_len = "
                f"{n_slots * max_len}"
            )
        self.n_slots, self.max_len, self.kv_tokens = n_slots, max_len, kv_tokens
        self._free = list(range(n_slots))  # a heap: the lowest free slot first
        self._slot: dict[str, int] = {}
        self._owner: dict[int, str] = {}  # the inverse of _slot
        self._reserved: dict[str, int] = {}
        self._tokens_reserved = 0  # sum of _reserved
        self._released: list[int] = []  # freed since take_released()

    def allocate(self, request_id: str, needed_tokens: int) -> int | None:
        """A slot for the request, its `needed_tokens` reserved in the pool; or None when every
        slot is taken or the pool lacks room (the caller decides: wait; no_room() says which)."""
        if request_id in self._slot:
            raise ValueError(f"request {request_id!r} already holds slot {self._slot[request_id]}")
        if needed_tokens > self.max_len:
            # admission (check_fits) should have refused it; waiting would never help
            raise ContextOverflow(needed_tokens, 0, self.max_len)
        if self.no_room(needed_tokens):
            return None
        slot = heapq.heappop(self._free)
        self._slot[request_id], self._reserved[request_id] = slot, needed_tokens
        self._owner[slot] = request_id
        self._tokens_reserved += needed_tokens
        return slot

    def no_room(self, needed_tokens: int) -> str | None:
        """Why a request of `needed_tokens` cannot be allocated now (WAIT_SLOT, WAIT_KV_TOKENS),
        or None when it can."""
        if not self._free:
            return WAIT_SLOT
        if self._tokens_reserved + needed_tokens > self.kv_tokens:
            return WAIT_KV_TOKENS
        return None

    def free(self, request_id: str) -> None:
        """The request's slot and tokens go back to the pool; the slot is queued for
        take_released() (its cached positions are no longer needed)."""
        slot = self._slot.pop(request_id)  # KeyError: the caller freed twice (a scheduler bug)
        self._tokens_reserved -= self._reserved.pop(request_id)
        del self._owner[slot]
        heapq.heappush(self._free, slot)
        self._released.append(slot)

    def take_released(self) -> tuple[int, ...]:
        """The slots freed since the last call, for the runner to give their memory back."""
        released, self._released = tuple(self._released), []
        return released

    def compact(self, reserve: int = 0) -> list[tuple[str, int, int]]:
        """Moves the request in the highest taken slot into the lowest free one while that is
        below it, leaving the `reserve` lowest free slots for requests about to be admitted
        (they take the lowest first), so the taken slots end up contiguous from 0. Returns
        (request_id, from, to) per move; the caller copies each cache row before it is used."""
        if not self._owner or max(self._owner) == len(self._owner) - 1:
            return []  # taken slots are 0 .. n-1 already: the steady state, checked each step
        moves = []
        while self._owner and len(self._free) > reserve:
            target = sorted(self._free)[reserve]
            high = max(self._owner)
            if target > high:
                break
            self._free.remove(target)
            self._free.append(high)
            heapq.heapify(self._free)
            request_id = self._owner.pop(high)
            self._owner[target], self._slot[request_id] = request_id, target
            moves.append((request_id, high, target))
        return moves

    def slot_of(self, request_id: str) -> int | None:
        return self._slot.get(request_id)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def usage(self) -> KVUsage:
        return KVUsage(
            slots_used=len(self._slot),
            n_slots=self.n_slots,
            tokens_reserved=self._tokens_reserved,
            token_capacity=self.kv_tokens,
        )
