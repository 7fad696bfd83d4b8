"""Backs the memory a model load allocated with 2 MiB pages (Linux transparent huge pages).

A batch-1 decode streams every weight once per token (84 MB for SmolLM2-135M int4): on 4 KiB
pages that is ~21,000 TLB misses a step, each a page walk (a two-dimensional one under a
hypervisor). Most distributions ship THP in `madvise` mode (as on the machine measured): memory
gets huge pages only where the program asks, and ONNX Runtime, which allocates its prepacked
weights and the KV cache with malloc, never asks. So the runner does, once, after the load:

    before = anonymous_regions()        # the process's private anonymous mappings
    ... create the session ...
    advised = advise_huge_pages(before)   # cheap: later faults there take huge pages
    ... map the KV cache (engine/kv_memory.py): collapsing it would make all of it resident
    ... after the first forward, on a thread of its own:
    report = advised.collapse()

Every private anonymous mapping that is new or has grown since `before` (glibc's heap, where
most prepacked weights land, its per-allocation mmaps, ONNX Runtime's arena chunks) is madvised
MADV_HUGEPAGE, so later faults there take huge pages, then MADV_COLLAPSE (Linux 6.1+), which
rebuilds what is already resident as huge pages now rather than whenever khugepaged gets to it.
The collapse copies every resident page (0.3-0.5 s for SmolLM2-135M int4, 2 busy cores): the
runner runs it after its first forward, so that a cold start's first token does not wait for
it (`back_with_huge_pages` does both at once).
File mappings are left alone: ONNX Runtime maps an external-data file, and an embedding table
read row by row from it stays mostly not resident; collapsing it would read it all in.

Measured on SmolLM2-135M int4, 2 cores, each engine the only one in its process as a server
runs it (`benchmarks/engine_hugepages.py`): see docs/benchmarks.md. PyTorch
(THP_MEM_ALLOC_ENABLE) and numpy (arrays of 4 MiB and more) ask for huge pages the same way.
"""

from __future__ import annotations

import ctypes
import sys
from dataclasses import dataclass
from pathlib import Path

MADV_HUGEPAGE = 14
MADV_COLLAPSE = 25  # Linux 6.1
_THP = Path("/sys/kernel/mm/transparent_hugepage")


@dataclass(frozen=True)
class HugePages:
    """What back_with_huge_pages did."""

    advised_bytes: int  # madvised MADV_HUGEPAGE: the 2 MiB-aligned parts of new mappings
    huge_bytes: int  # backed by huge pages right after (AnonHugePages gained there)
    skipped: str | None = None  # why nothing was done, when nothing was
    pending: bool = False  # advised; the collapse is still to run (Collapse)

    def describe(self) -> str:
        if self.skipped:
            return f"huge pages: none ({self.skipped})"
        if self.pending:
            return (
                f"huge pages: {self.advised_bytes >> 20} MiB of weights advised, collapsed to "
                f"2 MiB pages after the first forward"
            )
        return (
            f"huge pages: {self.huge_bytes >> 20} MiB of weights and cache on 2 MiB pages "
            f"({self.advised_bytes >> 20} MiB advised)"
        )


def anonymous_regions() -> set[tuple[int, int]]:
    """(start, end) of the process's private, writable, anonymous mappings (the heap
    included); empty where there is no /proc/self/maps."""
    try:
        text = Path("/proc/self/maps").read_text()
    except OSError:
        return set()
    regions = set()
    for line in text.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) < 5 or fields[1] != "rw-p" or fields[4] != "0":
            continue  # shared, read-only, or backed by a file (inode != 0)
        if len(fields) == 6 and fields[5].strip() not in ("", "[heap]"):
            continue  # [stack], [vvar] and other special mappings
        start, end = (int(x, 16) for x in fields[0].split("-"))
        regions.add((start, end))
    return regions


def thp_unavailable() -> str | None:
    """Why transparent huge pages cannot be asked for here, or None."""
    if sys.platform != "linux":
        return f"transparent huge pages are a Linux feature; this is {sys.platform}"
    try:
        mode = (_THP / "enabled").read_text()
    except OSError:
        return "this kernel has no transparent huge pages"
    if "[never]" in mode:
        return f"{_THP / 'enabled'} is 'never'"
    return None


def back_with_huge_pages(before: set[tuple[int, int]]) -> HugePages:
    """madvise every private anonymous mapping not in `before` (new or grown) to huge pages and
    collapse what is already resident; see the module docstring."""
    advised = advise_huge_pages(before)
    return advised.report if advised.report.skipped else advised.collapse()


class Advised:
    """Mappings advised MADV_HUGEPAGE whose resident pages are still to be collapsed: the
    collapse (~0.3-0.5 s for SmolLM2-135M int4, a copy of every resident page) is work a cold
    start's first token does not need, so a runner runs it after its first forward."""

    def __init__(self, ranges: list[tuple[int, int]], report: HugePages):
        self.ranges, self.report = ranges, report

    def collapse(self) -> HugePages:
        """MADV_COLLAPSE over the advised ranges → what it achieved. The kernel collapses
        under concurrent use of the memory, so a forward may run meanwhile."""
        if not self.ranges:
            return self.report
        libc = _libc()
        huge_before = _anon_huge_bytes(self.ranges)
        for lo, hi in self.ranges:
            # a failure leaves the advice standing: EINVAL on a kernel before 6.1 (khugepaged
            # then collapses the pages in its own time), EAGAIN / ENOMEM when no huge page is
            # free now
            libc.madvise(lo, hi - lo, MADV_COLLAPSE)
        gained = max(0, _anon_huge_bytes(self.ranges) - huge_before)
        return HugePages(self.report.advised_bytes, gained)


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def advise_huge_pages(before: set[tuple[int, int]]) -> Advised:
    """madvise every private anonymous mapping not in `before` (new or grown) MADV_HUGEPAGE,
    so that later faults there take huge pages; collapsing what is resident is left to
    `Advised.collapse()`."""
    skipped = thp_unavailable()
    if skipped:
        return Advised([], HugePages(0, 0, skipped))
    try:
        page = int((_THP / "hpage_pmd_size").read_text())
    except (OSError, ValueError):
        page = 2 << 20
    ranges = []
    for start, end in sorted(anonymous_regions() - before):
        lo, hi = -(-start // page) * page, end // page * page  # whole huge pages only
        if hi > lo:
            ranges.append((lo, hi))
    if not ranges:
        nothing = "the load mapped no new anonymous memory of a huge page or more"
        return Advised([], HugePages(0, 0, nothing))
    libc = _libc()
    advised = []
    for lo, hi in ranges:
        if libc.madvise(lo, hi - lo, MADV_HUGEPAGE) == 0:  # else e.g. unmapped meanwhile
            advised.append((lo, hi))
    total = sum(hi - lo for lo, hi in advised)
    return Advised(advised, HugePages(total, 0, pending=True))


def _anon_huge_bytes(ranges: list[tuple[int, int]]) -> int:
    """AnonHugePages of the mappings that overlap `ranges`, from /proc/self/smaps."""
    try:
        text = Path("/proc/self/smaps").read_text()
    except OSError:
        return 0
    total, inside = 0, False
    for line in text.splitlines():
        head = line.split(maxsplit=1)[0]
        if not head.endswith(":"):  # a mapping's header line: start-end perms ...
            start, end = (int(x, 16) for x in head.split("-"))
            inside = any(start < hi and lo < end for lo, hi in ranges)
        elif inside and head == "AnonHugePages:":
            total += int(line.split()[1]) * 1024
    return total
