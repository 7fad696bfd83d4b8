"""KV slot bookkeeping: lowest slot first, "no room" as None (and why), a pool of tokens."""

from __future__ import annotations

import pytest

from engine.errors import ContextOverflow
from engine.kv_cache import WAIT_KV_TOKENS, WAIT_SLOT, KVSlots, check_fits


def test_slots_are_handed_out_lowest_first_and_none_when_full():
    kv = KVSlots(n_slots=2, max_len=100)
    assert kv.allocate("a", 30) == 0
    assert kv.allocate("b", 50) == 1
    assert kv.allocate("c", 10) is None
    usage = kv.usage()
    assert (usage.slots_used, usage.tokens_reserved, usage.token_capacity) == (2, 80, 200)
    assert usage.fraction == 0.4
    kv.free("a")
    assert kv.slot_of("a") is None
    assert kv.allocate("c", 10) == 0
    with pytest.raises(KeyError):
        kv.free("a")


def test_what_cannot_fit_a_slot_is_an_error_not_a_wait():
    kv = KVSlots(n_slots=1, max_len=16)
    with pytest.raises(ContextOverflow):
        kv.allocate("a", 17)
    with pytest.raises(ContextOverflow, match=r"= 17 tokens, more than the 16"):
        check_fits(prompt_tokens=10, max_tokens=7, max_len=16)
    check_fits(prompt_tokens=10, max_tokens=6, max_len=16)


def test_compaction_moves_the_highest_slots_into_the_lowest_holes():
    kv = KVSlots(n_slots=6, max_len=100)
    for rid in "abcdef":
        kv.allocate(rid, 10)
    for rid in "bdf":
        kv.free(rid)
    # taken: a0 c2 e4 → e moves into 1, then nothing is above a hole
    assert kv.compact() == [("e", 4, 1)]
    assert [kv.slot_of(r) for r in "ace"] == [0, 2, 1]
    assert kv.compact() == []
    assert kv.allocate("g", 10) == 3  # the free slots are 3, 4, 5 again
    kv.free("a")
    assert kv.compact() == [("g", 3, 0)]
    assert kv.usage().slots_used == 3 and kv.num_free == 3


def test_compaction_leaves_the_lowest_holes_to_requests_about_to_be_admitted():
    kv = KVSlots(n_slots=6, max_len=100)
    for rid in "abcdef":
        kv.allocate(rid, 10)
    for rid in "bcd":
        kv.free(rid)
    # holes 1, 2, 3 under e4 and f5; one request waits: it will take 1, so 2 and 3 are filled
    assert kv.compact(reserve=1) == [("f", 5, 2), ("e", 4, 3)]
    assert kv.allocate("g", 10) == 1
    assert sorted(kv.slot_of(r) for r in "aefg") == [0, 1, 2, 3]
    assert kv.compact(reserve=5) == []  # more waiting than holes: nothing to move


def test_the_pool_reserves_prompt_plus_max_tokens_and_says_what_ran_out():
    kv = KVSlots(n_slots=3, max_len=100, kv_tokens=150)
    assert kv.allocate("a", 100) == 0
    assert kv.no_room(60) == WAIT_KV_TOKENS and kv.allocate("b", 60) is None
    assert kv.allocate("b", 50) == 1  # exactly full
    usage = kv.usage()
    assert (usage.tokens_reserved, usage.token_capacity, usage.fraction) == (150, 150, 1.0)
    kv.free("a")
    assert kv.allocate("c", 100) == 0 and kv.allocate("d", 0) == 2
    assert kv.no_room(1) == WAIT_SLOT  # every slot taken comes first
    assert kv.take_released() == (0,) and kv.take_released() == ()


def test_a_pool_outside_one_request_to_every_slot_full_is_refused():
    with pytest.raises(ValueError, match=r"kv_tokens=99 must be in max_len=100 .. .* = 300"):
        KVSlots(n_slots=3, max_len=100, kv_tokens=99)
    with pytest.raises(ValueError, match=r"kv_tokens=301"):
        KVSlots(n_slots=3, max_len=100, kv_tokens=301)
    assert KVSlots(n_slots=3, max_len=100).usage().token_capacity == 300
