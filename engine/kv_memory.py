"""The KV cache's host memory: one private anonymous mapping, resident only where positions have
been written, handed back slot by slot.

    mapping  [ array 0 | array 1 | ... ]     one array per layer and kind (key, value)
    array    [ slot 0 | slot 1 | ... ]       each (n_slots, K, max_len, hd), C order
    slot     [ head 0: pos 0 .. max_len-1 | head 1: ... ]     one row of `row_bytes`

The kernel backs an anonymous page on its first write and reads an unwritten one as zeros, so a
cache of n_slots × max_len positions costs, resident, only the pages its requests have written:
about one 4 KiB page per 16 positions per head (SmolLM2-135M, fp32). Nothing fills it at load.
`release(slot)` gives a slot's pages back (MADV_DONTNEED over its row in every array: they read
as zeros again and cost nothing), so resident memory follows the tokens in use rather than the
most the slots ever held. `resident_bytes()` asks the kernel (mincore) what is resident now.

Why zeros still hold: the cache used to be zero-filled at load so that a read past a row's
length would read zeros, not garbage. Every page here is either never written (zeros), released
(zeros) or written by the graph (the values it computed), which is all a zero-filled cache ever
held; GroupQueryAttention reads a row's positions 0 .. seqlens_k only, each written before.

The mapping is advised MADV_NOHUGEPAGE: a 2 MiB page would be backed whole on its first write
(a slot's row of one array is 1.5 MiB for SmolLM2-135M at 2048 positions, so one token would make
a slot's whole row resident, and its neighbours'), and a kernel with THP "always" would do that
unasked. engine/hugepages.py leaves the mapping alone: the runner maps it after collapsing the
weights.

The other memory a step uses, the graph's activations, comes from the C heap (the runner turns
ONNX Runtime's CPU arena off, which would keep the most a batched prefill ever took for good);
`trim_heap()` gives its free pages back once the whole cache is released, so an engine gone
idle holds its weights and little else.
"""

from __future__ import annotations

import ctypes
import mmap
import sys
from collections.abc import Sequence
from functools import cache

import numpy as np

PAGE = mmap.PAGESIZE


class HostKV:
    """`len(names)` arrays of shape (n_slots, *row_shape) over one anonymous mapping."""

    def __init__(
        self, names: Sequence[str], n_slots: int, row_shape: tuple[int, ...], dtype: np.dtype
    ):
        self.n_slots = n_slots
        self.dtype = np.dtype(dtype)
        self.row_bytes = int(np.prod(row_shape)) * self.dtype.itemsize
        # each array starts on a page, so a slot's pages never straddle two arrays
        self.array_bytes = -(-n_slots * self.row_bytes // PAGE) * PAGE
        self.nbytes = self.array_bytes * len(names)
        self._map = mmap.mmap(-1, self.nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_NOHUGEPAGE"):  # Linux; see the module docstring
            self._map.madvise(mmap.MADV_NOHUGEPAGE)
        flat = np.frombuffer(self._map, dtype=np.uint8)
        self.address = flat.ctypes.data
        self.arrays: dict[str, np.ndarray] = {}
        for i, name in enumerate(names):
            start = i * self.array_bytes
            raw = flat[start : start + n_slots * self.row_bytes]
            self.arrays[name] = raw.view(self.dtype).reshape(n_slots, *row_shape)

    def pointer(self, name: str, slot: int = 0) -> int:
        """The address of `slot`'s row in array `name` (rows of a range are consecutive)."""
        return self.arrays[name].ctypes.data + slot * self.row_bytes

    def release(self, slot: int) -> None:
        """Gives `slot`'s pages back in every array: they read as zeros and cost nothing until
        written again. Only the pages wholly inside the slot's rows are released, so a neighbour
        slot sharing an edge page keeps its positions."""
        if not 0 <= slot < self.n_slots:
            raise ValueError(f"slot {slot} is outside 0..{self.n_slots - 1}")
        if not hasattr(mmap, "MADV_DONTNEED"):
            return  # no madvise on this platform: the pages stay, still correct
        for i in range(len(self.arrays)):
            start = i * self.array_bytes + slot * self.row_bytes
            lo, hi = -(-start // PAGE) * PAGE, (start + self.row_bytes) // PAGE * PAGE
            if hi > lo:
                self._map.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def resident_bytes(self) -> int:
        """The bytes of the mapping resident now (mincore), or all of it where the kernel
        cannot say (not Linux). A page only read since its release maps the shared zero page,
        which mincore counts and RSS does not; the engine reads only written positions."""
        if sys.platform != "linux":
            return self.nbytes
        pages = self.nbytes // PAGE
        vec = (ctypes.c_ubyte * pages)()
        if _libc().mincore(ctypes.c_void_p(self.address), self.nbytes, vec) != 0:
            return self.nbytes
        return int(np.count_nonzero(np.frombuffer(vec, np.uint8) & 1)) * PAGE


def trim_heap() -> bool:
    """Hands the free pages of every malloc arena back to the kernel (glibc's malloc_trim: the
    heap's top is shrunk and free pages inside it are released): what the activations of the
    last steps took and freed stops counting in RSS. Whether any was given back: never where
    the C library has no malloc_trim (not glibc)."""
    trim = getattr(_libc(), "malloc_trim", None)
    return bool(trim(0)) if trim is not None else False


@cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    if hasattr(libc, "malloc_trim"):
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
    return libc
