"""Huge pages for what a model load allocated (engine/hugepages.py), on real mappings."""

from __future__ import annotations

import ctypes
import mmap
import sys

import numpy as np
import pytest

from engine import hugepages
from engine.hugepages import anonymous_regions, back_with_huge_pages, thp_unavailable
from engine.runner import OrtRunner

linux_thp = pytest.mark.skipif(
    thp_unavailable() is not None, reason=f"no transparent huge pages: {thp_unavailable()}"
)


def _private_mapping(n_bytes: int) -> tuple[mmap.mmap, int]:
    m = mmap.mmap(-1, n_bytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m.write(b"\1" * n_bytes)  # resident, as loaded weights are
    return m, ctypes.addressof(ctypes.c_char.from_buffer(m))


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/maps")
def test_a_new_private_mapping_is_found_and_nothing_else_is_new():
    before = anonymous_regions()
    m, address = _private_mapping(8 << 20)
    new = anonymous_regions() - before
    assert any(start <= address < end for start, end in new)
    shared = mmap.mmap(-1, 8 << 20)  # MAP_SHARED: not the process's private memory
    shared_at = ctypes.addressof(ctypes.c_char.from_buffer(shared))
    assert not any(start <= shared_at < end for start, end in anonymous_regions())
    del m, shared


@linux_thp
def test_new_memory_is_advised_and_collapsed_to_huge_pages():
    before = anonymous_regions()
    m, _ = _private_mapping(16 << 20)
    report = back_with_huge_pages(before)
    assert report.skipped is None
    assert report.advised_bytes >= 12 << 20  # the 2 MiB-aligned interior at least
    if report.huge_bytes == 0:
        pytest.skip("MADV_COLLAPSE did nothing here (a kernel before 6.1, or no free huge page)")
    assert report.huge_bytes >= 8 << 20
    assert "MiB of weights and cache on 2 MiB pages" in report.describe()
    del m


@linux_thp
def test_nothing_new_is_said_plainly():
    report = back_with_huge_pages(anonymous_regions())
    assert (report.advised_bytes, report.huge_bytes) == (0, 0)
    assert "no new anonymous memory" in report.describe()


def test_thp_set_to_never_is_named(tmp_path, monkeypatch):
    (tmp_path / "enabled").write_text("always madvise [never]\n")
    monkeypatch.setattr(hugepages, "_THP", tmp_path)
    monkeypatch.setattr(hugepages.sys, "platform", "linux")
    report = back_with_huge_pages(set())
    assert report.advised_bytes == 0
    assert report.skipped == f"{tmp_path / 'enabled'} is 'never'"
    assert report.describe().startswith("huge pages: none (")


def test_a_runner_on_huge_pages_computes_the_same_logits(tiny_package):
    path = tiny_package / "onnx-fp32" / "model.onnx"
    runners = [OrtRunner(path, 2, 64, threads=1, huge_pages=on) for on in (True, False)]
    assert runners[1].huge_pages.skipped == "turned off"
    ids = np.array([[5, 9, 3, 7]], np.int64)
    logits = [
        r.forward(ids, np.arange(4)[None], np.array([3]), np.array([3])).copy() for r in runners
    ]
    np.testing.assert_array_equal(logits[0], logits[1])


@linux_thp
def test_a_runner_advises_at_load_and_collapses_after_its_first_forward(tiny_package):
    r = OrtRunner(tiny_package / "onnx-fp32" / "model.onnx", 2, 64, threads=1)
    if r.huge_pages.skipped:
        pytest.skip(r.huge_pages.skipped)  # a tiny model may map nothing of a huge page
    assert r.huge_pages.pending and r._collapser is None
    assert "after the first forward" in r.huge_pages.describe()
    ids = np.array([[5, 9, 3, 7]], np.int64)
    r.forward(ids, np.arange(4)[None], np.array([3]), np.array([3]))
    r._collapser.join(timeout=30)
    assert not r.huge_pages.pending and r.huge_pages.advised_bytes > 0
    r.forward(ids, np.arange(4)[None], np.array([3]), np.array([3]))  # no second collapse
