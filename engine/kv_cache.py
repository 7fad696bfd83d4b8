"""Which request holds which KV slot.

The runner allocates the cache once and updates it in place (IO binding); this module owns only
the bookkeeping. One tensor per layer and per K/V, a fixed pool of slots, each a whole row of
`max_len` positions (ORT's CPU GroupQueryAttention has no paged layout, serving.md 3.2):

                  position 0 ..................................... max_len - 1
    cache[slot 0] | prompt "a" ....... | out "a" .. |  reserved  |  free       |
    cache[slot 1] |                      free slot                             |
    cache[slot 2] | prompt "b" .. | out "b" ....... |      reserved            |
                  ^--- num_computed_tokens ---^  (seqlens_k = num_computed - 1)
    shape per layer: (n_slots, n_kv, max_len, head_dim)

A request reserves prompt + max_tokens positions of its row, so admission refuses what cannot
fit and a running request never runs out of room (no preemption). The lowest free slot is handed
out first, and `compact()` moves requests down into the holes that finished ones leave: the
runner binds a contiguous range of slots per forward, and on a CPU every free slot inside that
range would be computed as a dummy row (a decode row costs as much as a real one there).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from engine.errors import ContextOverflow


def check_fits(prompt_tokens: int, max_tokens: int, max_len: int) -> None:
    """Admission: prompt + max_tokens must fit one slot; else ContextOverflow with the numbers."""
    if prompt_tokens + max_tokens > max_len:
        raise ContextOverflow(prompt_tokens, max_tokens, max_len)


@dataclass(frozen=True, slots=True)
class KVUsage:
    slots_used: int
    n_slots: int
    tokens_reserved: int  # sum of prompt + max_tokens over the requests holding a slot
    token_capacity: int  # n_slots × max_len

    @property
    def fraction(self) -> float:
        return self.tokens_reserved / self.token_capacity


class KVSlots:
    """A fixed pool of `n_slots` sequence slots of `max_len` tokens each."""

    def __init__(self, n_slots: int, max_len: int):
        if n_slots < 1 or max_len < 1:
            raise ValueError(f"n_slots={n_slots} and max_len={max_len} must both be >= 1")
        self.n_slots, self.max_len = n_slots, max_len
        self._free = list(range(n_slots))  # a heap: the lowest free slot first
        self._slot: dict[str, int] = {}
        self._owner: dict[int, str] = {}  # the inverse of _slot
        self._reserved: dict[str, int] = {}

    def allocate(self, request_id: str, needed_tokens: int) -> int | None:
        """A slot for the request, or None when every slot is taken (the caller decides: wait)."""
        if request_id in self._slot:
            raise ValueError(f"request {request_id!r} already holds slot {self._slot[request_id]}")
        if needed_tokens > self.max_len:
            # admission (check_fits) should have refused it; waiting would never help
            raise ContextOverflow(needed_tokens, 0, self.max_len)
        if not self._free:
            return None
        slot = heapq.heappop(self._free)
        self._slot[request_id], self._reserved[request_id] = slot, needed_tokens
        self._owner[slot] = request_id
        return slot

    def free(self, request_id: str) -> None:
        slot = self._slot.pop(request_id)  # KeyError: the caller freed twice (a scheduler bug)
        del self._reserved[request_id], self._owner[slot]
        heapq.heappush(self._free, slot)

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
            tokens_reserved=sum(self._reserved.values()),
            token_capacity=self.n_slots * self.max_len,
        )
