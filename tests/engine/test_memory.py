"""Memory that grows with use: the host KV cache is resident only where positions are written,
a released slot gives its pages back, and the KV pool admits requests only while their prompt +
max_tokens fit (engine/kv_memory.py, engine/kv_cache.py, StepRunner.release); a float16 cache
(an onnx-*-kv16 target) takes half the bytes per position."""

from __future__ import annotations

import asyncio
import ctypes
import gc
import random
import sys
from pathlib import Path

import numpy as np
import pytest

from engine import runner as runner_module
from engine.async_engine import AsyncEngine
from engine.kv_cache import WAIT_KV_TOKENS, WAIT_SLOT
from engine.kv_memory import PAGE, HostKV, trim_heap
from engine.loader import EngineConfig, open_core
from engine.request import EngineRequest, SamplingParams
from engine.runner import OrtRunner
from engine.scheduler import Scheduler, SchedulerConfig
from registry.manifest import load
from tests.engine.test_scheduler import BASE, FakeModel, alone, request, step

KV16_LOGIT_TOL = 0.01  # a float16 cache against a float32 one, same weights: measured 1.2e-3
linux = pytest.mark.skipif(sys.platform != "linux", reason="mincore and /proc/self/smaps")


def vm_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def smaps_rss(address: int) -> int:
    """Rss of the mapping that holds `address`, as /proc/self/smaps states it: the kernel's
    own account, to check mincore's against."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split(maxsplit=1)[0]
        if not head.endswith(":"):
            start, end = (int(x, 16) for x in head.split("-"))
            inside = start <= address < end
        elif inside and head == "Rss:":
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no mapping holds {address:#x}")


def runner(tiny_package: Path, n_slots: int = 16, max_len: int = 128) -> OrtRunner:
    return OrtRunner(tiny_package / "onnx-fp32" / "model.onnx", n_slots, max_len, threads=1)


def prefill(r: OrtRunner, slot: int, n: int, seed: int = 0) -> np.ndarray:
    """A first prompt of n random tokens into `slot` → its last logits."""
    ids = np.random.default_rng(seed).integers(3, 200, (1, n))
    rows = range(slot, slot + 1)
    return r.forward(ids, np.arange(n)[None], np.array([n - 1]), np.array([n - 1]), rows).copy()


@linux
def test_the_cache_is_not_resident_after_load_and_grows_only_where_written(tiny_package):
    # earlier tests' caches unmapped first: the kernel merges adjacent mappings of the same
    # kind into one, whose Rss smaps would report together
    gc.collect()
    r = runner(tiny_package)
    kv = r._host_kv
    assert kv is not None and r.kv_bytes == kv.n_slots * kv.row_bytes * len(kv.arrays)
    # nothing filled at load: the kernel and mincore agree that (almost) nothing is resident
    assert r.kv_resident_bytes() <= r.kv_bytes // 100
    assert smaps_rss(kv.address) <= r.kv_bytes // 100
    prefill(r, 5, 100)
    resident = r.kv_resident_bytes()
    # 100 positions of one slot: every array's rows of that slot, page-rounded per head
    assert 100 * r.kv_token_bytes <= resident <= kv.row_bytes * len(kv.arrays) + 2 * PAGE
    assert smaps_rss(kv.address) == resident
    assert resident < r.kv_bytes // 8


@linux
def test_release_gives_the_pages_back_and_the_slot_reads_zeros(tiny_package):
    r = runner(tiny_package)
    kv = r._host_kv
    prefill(r, 2, 120)
    prefill(r, 3, 60, seed=1)
    both = r.kv_resident_bytes()
    r.release(2)
    assert r.lengths[2] == 0
    assert r.kv_resident_bytes() < both
    r.release(3)
    assert r.kv_resident_bytes() <= 2 * PAGE * len(kv.arrays)
    # (read only now: mincore counts the shared zero page a read maps as resident)
    assert all(not a[2:4].any() for a in kv.arrays.values()), "a released slot reads zeros"


@linux
def test_release_keeps_a_neighbour_that_shares_an_edge_page(tiny_package):
    r = runner(tiny_package, max_len=100)  # rows of 12800 B: slots 2 and 3 share a page
    kv = r._host_kv
    assert (3 * kv.row_bytes) % PAGE != 0
    prefill(r, 2, 90)
    prefill(r, 3, 90, seed=1)
    neighbour = {name: a[3].copy() for name, a in kv.arrays.items()}
    r.release(2)
    assert all(np.array_equal(kv.arrays[n][3], neighbour[n]) for n in neighbour)


def test_a_released_slot_computes_what_a_fresh_one_does(tiny_package):
    fresh = runner(tiny_package)
    want = prefill(fresh, 4, 50, seed=7)
    used = runner(tiny_package)
    prefill(used, 4, 110, seed=3)
    used.release(4)
    np.testing.assert_array_equal(prefill(used, 4, 50, seed=7), want)


def test_a_moved_slot_gives_its_old_rows_back(tiny_package):
    r = runner(tiny_package)
    prefill(r, 6, 80)
    before = r.kv_resident_bytes()
    r.move(6, 1, 80)
    kv = r._host_kv
    assert (r.lengths[1], r.lengths[6]) == (80, 0)
    if sys.platform == "linux":
        assert r.kv_resident_bytes() <= before + 2 * PAGE * len(kv.arrays)
    assert all(not a[6].any() for a in kv.arrays.values())


def test_host_kv_rows_are_consecutive_and_refuse_a_slot_outside():
    kv = HostKV(["a", "b"], n_slots=3, row_shape=(2, 5, 4), dtype=np.float32)
    assert kv.row_bytes == 2 * 5 * 4 * 4
    assert kv.pointer("a", 2) - kv.pointer("a", 0) == 2 * kv.row_bytes
    assert kv.pointer("b") % PAGE == 0  # each array starts on a page
    kv.arrays["b"][1] = 1.0
    kv.release(1)  # a row smaller than a page: nothing wholly inside, nothing released
    assert kv.arrays["b"][1].all()
    with pytest.raises(ValueError, match="slot 3 is outside 0..2"):
        kv.release(3)


@linux
def test_an_idle_engine_holds_no_cache_once_its_requests_finish(tiny_package):
    config = EngineConfig(n_slots=4, threads=1, token_budget=64)
    core, info = open_core(tiny_package, config)
    prompt = tuple(range(5, 25))
    for i in range(4):
        core.add(EngineRequest(f"r{i}", prompt, 30, sampling=SamplingParams(temperature=0)))
    peak = 0
    while core.has_work():
        core.step()
        peak = max(peak, core.runner.kv_resident_bytes())
    assert peak >= 4 * len(prompt) * core.runner.kv_token_bytes
    assert core.runner.kv_resident_bytes() == 0  # released as each finished, no step after

    async def stats():
        return await AsyncEngine(core, info).stats()

    s = asyncio.run(stats())
    assert s.kv_resident_bytes == 0 and s.memory_bytes == info.weights_bytes > 0
    assert s.kv_tokens_total == info.kv_tokens == 128 and s.queue_waiting_for == ""


@pytest.fixture(scope="module")
def kv16_package(tmp_path_factory, tiny_run) -> Path:
    """`tiny_run` exported with a float16 cache (onnx-fp32-kv16): its parity checked, not forced."""
    from exporters.package import export  # deferred: torch, which the engine needs not

    return export(tiny_run, ["onnx-fp32-kv16"], tmp_path_factory.mktemp("kv16") / "pkg")


@pytest.mark.slow
def test_a_float16_cache_passes_parity_and_halves_the_memory_per_position(
    kv16_package, tiny_package
):
    report = load(kv16_package).reports.parity["onnx-fp32-kv16"]
    assert report.passed and not report.forced
    assert report.ppl_increase <= 0.01 and report.top1_agreement >= 0.98
    half = OrtRunner(kv16_package / "onnx-fp32-kv16" / "model.onnx", 4, 128, threads=1)
    full = runner(tiny_package, n_slots=4)
    assert half.kv_dtype == np.float16 and full.kv_dtype == np.float32
    assert half.kv_token_bytes * 2 == full.kv_token_bytes and half.kv_bytes * 2 == full.kv_bytes
    # the same prompt in both: near logits, and the float16 cache holds it in half the pages
    logits_half, logits_full = prefill(half, 1, 100), prefill(full, 1, 100)
    assert np.abs(logits_half - logits_full).max() <= KV16_LOGIT_TOL
    assert 100 * half.kv_token_bytes <= half.kv_resident_bytes() < full.kv_resident_bytes()


@pytest.mark.slow
def test_the_engine_serves_a_float16_cache_package(kv16_package):
    core, info = open_core(kv16_package, EngineConfig(n_slots=4, threads=1, token_budget=64))
    assert core.runner.kv_dtype == np.float16
    prompt = tuple(range(5, 25))
    for i in range(4):
        core.add(EngineRequest(f"r{i}", prompt, 20, sampling=SamplingParams(temperature=0)))
    emitted: dict[str, list[int]] = {}
    while core.has_work():
        for out in core.step():
            emitted.setdefault(out.request_id, []).extend(out.token_ids)
    # four rows of one prompt decoded together: the same greedy tokens in every row
    assert len(emitted) == 4 and len({tuple(t) for t in emitted.values()}) == 1
    assert core.runner.kv_resident_bytes() == 0


@linux
def test_trim_heap_gives_back_what_was_freed_inside_the_heap():
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "malloc_trim"):
        pytest.skip("the C library has no malloc_trim (not glibc)")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    # 64 MiB in blocks below malloc's mmap threshold, all freed but the highest: a hole inside
    # the heap, which free() alone does not give back (only a free top of the heap goes back)
    blocks = sorted(libc.malloc(32 << 10) for _ in range(2048))
    for b in blocks:
        ctypes.memset(b, 1, 32 << 10)
    for b in blocks[:-1]:
        libc.free(b)
    freed = vm_rss()
    assert trim_heap()
    assert vm_rss() < freed - (48 << 20)
    libc.free(blocks[-1])


def test_the_runner_keeps_no_arena_and_trims_the_heap_once_no_slot_holds_tokens(
    tiny_package, monkeypatch
):
    r = runner(tiny_package)
    assert r.session.get_session_options().enable_cpu_mem_arena is False
    trims = []
    monkeypatch.setattr(runner_module, "trim_heap", lambda: trims.append(r.lengths.copy()))
    prefill(r, 2, 40)
    prefill(r, 3, 40, seed=1)
    r.move(3, 0, 40)  # the source is released while the destination holds its tokens
    r.release(2)
    assert trims == []
    r.release(0)
    assert len(trims) == 1 and not trims[0].any()


# ── the pool, on the scheduler alone (no runtime) ──


def test_the_pool_holds_a_request_while_a_slot_is_free_and_says_why():
    model = FakeModel()
    sched = Scheduler(SchedulerConfig(**BASE | dict(kv_tokens=300, token_budget=256)))
    sched.add(request("a", prompt=130, max_tokens=10))  # 140 tokens each
    sched.add(request("b", prompt=100, max_tokens=40))
    sched.add(request("c", prompt=100, max_tokens=40))
    out, _ = step(sched, model)
    assert {c.request_id for c in out.prefills} == {"a", "b"}  # 280 of 300 reserved
    usage = sched.usage()
    assert (usage.tokens_reserved, usage.token_capacity) == (280, 300)
    assert usage.slots_used == 2 and usage.waiting_for == WAIT_KV_TOKENS
    while sched.num_running == 2:
        out, _ = step(sched, model)
        assert not out.prefills  # two slots stay free all along: the pool holds c back
    out, _ = step(sched, model)  # a finished: its 140 tokens are back, c starts
    assert [c.request_id for c in out.prefills] == ["c"] and sched.usage().waiting_for is None


def test_slots_running_out_is_told_apart_from_the_pool():
    sched, model = Scheduler(SchedulerConfig(**BASE | dict(n_slots=1))), FakeModel()
    sched.add(request("a", prompt=5))
    sched.add(request("b", prompt=5))
    step(sched, model)
    assert sched.usage().waiting_for == WAIT_SLOT


def test_freed_slots_are_released_once_at_the_next_step():
    sched, model = Scheduler(SchedulerConfig(**BASE)), FakeModel()
    sched.add(request("a", prompt=5, max_tokens=1))
    sched.add(request("b", prompt=5, max_tokens=3))
    out, _ = step(sched, model)  # a finishes with its first token
    assert out.released == ()
    assert sched.kv.take_released() == (0,)  # the engine core takes it right after update()
    sched.add(request("c", prompt=5))
    sched.abort("b")
    out, _ = step(sched, model)  # b's abort applies at this step's boundary
    assert out.released == (1,) and sched.kv.take_released() == ()


def test_random_load_never_reserves_past_the_pool_and_matches_each_request_alone():
    rng = random.Random(7)
    config = SchedulerConfig(**BASE | dict(n_slots=6, max_len=96, max_waiting=200, kv_tokens=200))
    sched, model = Scheduler(config), FakeModel()
    requests = {}
    for i in range(60):
        prompt = rng.randint(1, 60)
        requests[f"r{i}"] = request(f"r{i}", prompt, rng.randint(1, 96 - prompt))
    arrive = {rid: rng.randrange(200) for rid in requests}
    outputs: dict[str, list[int]] = {rid: [] for rid in requests}
    pool_waits = 0
    for now in range(3000):
        for rid in [r for r, t in arrive.items() if t == now]:
            sched.add(requests[rid])
        if not sched.has_unfinished() and now > 200:
            break
        _, updated = step(sched, model)
        usage = sched.usage()
        assert usage.tokens_reserved <= config.kv_tokens
        pool_waits += usage.waiting_for == WAIT_KV_TOKENS
        for state in updated:
            outputs[state.request_id] = list(state.output_token_ids)
    assert not sched.has_unfinished()
    assert pool_waits > 0, "the pool never held a request back"
    for rid, req in requests.items():
        assert outputs[rid] == alone(req)[0], rid
