"""Many writers at once, on the local backend (moto's conditional writes are check-then-act
without a lock, so races there prove nothing): separate processes, as separate CI jobs are."""

from __future__ import annotations

import multiprocessing
import time
from collections import Counter

from registry.registry import Registry
from tests.registry import helpers
from tests.registry.helpers import tree, write_package

PROCESSES = 6


def _soon() -> float:
    return time.time() + 2.0  # after every spawned process has imported the registry


def _pool():
    return multiprocessing.get_context("spawn").Pool(PROCESSES)


def test_concurrent_pushes_get_distinct_versions(tmp_path):
    uri, pkg = str(tmp_path / "registry"), write_package(tmp_path / "pkg")
    with _pool() as pool:
        results = pool.starmap(helpers.push_many, [(uri, str(pkg), "tiny", 5, _soon())] * PROCESSES)
    got = sorted(v for r in results for v in r)
    assert got == list(range(1, 31))  # no duplicates, no gaps
    reg = Registry.open(uri)
    assert [v.version for v in reg.versions("tiny")] == got
    pushes = [e for e in reg.events("tiny") if e.action == "push"]
    assert sorted(e.version for e in pushes) == got
    assert len({e.who for e in pushes}) == PROCESSES


def test_concurrent_alias_moves_are_never_lost(tmp_path):
    uri = str(tmp_path / "registry")
    reg = Registry.open(uri)
    for i in range(4):
        reg.push(write_package(tmp_path / f"v{i}", weights=bytes([i]) * 100), "tiny")
    with _pool() as pool:
        results = pool.starmap(
            helpers.move_many, [(uri, "tiny", "production", 5, [1, 2, 3, 4], _soon())] * PROCESSES
        )
    moves = [m for ms, _ in results for m in ms]
    assert len(moves) == PROCESSES * 5
    print(f"{sum(c for _, c in results)} lost compare-and-swaps retried")

    events = sorted((e for e in reg.events("tiny") if e.alias == "production"), key=lambda e: e.seq)
    # each successful compare-and-swap appears exactly once, and the moves form one chain
    assert [e.seq for e in events] == list(range(1, len(moves) + 1))
    assert Counter((e.from_version, e.version) for e in events) == Counter(moves)
    for before, after in zip(events, events[1:], strict=False):
        assert after.from_version == before.version
    record, _ = reg.alias("tiny", "production")
    assert (record.seq, record.version) == (len(moves), events[-1].version)


def test_concurrent_pulls_share_one_cache(tmp_path):
    uri = str(tmp_path / "registry")
    pkg = write_package(tmp_path / "pkg", weights=bytes(range(256)) * 40_000)  # 10 MB
    Registry.open(uri).push(pkg, "tiny")
    cache = str(tmp_path / "cache")
    with _pool() as pool:
        paths = pool.starmap(helpers.pull_one, [(uri, "tiny:1", cache, _soon())] * PROCESSES)
    assert len(set(paths)) == 1
    from pathlib import Path

    assert tree(Path(paths[0])) == tree(pkg)
    leftovers = [p.name for p in (tmp_path / "cache").rglob("*") if ".partial" in p.name]
    assert leftovers == []
