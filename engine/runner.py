"""Runs the engine graph (contract 2, engine/graph.py) on ONNX Runtime over a KV cache
allocated once.

The cache is one array per layer and kind, of shape [n_slots, K, max_len, hd] (on the CPU over
one anonymous mapping, resident only where positions are written: engine/kv_memory.py), and
every forward binds each `present_*` output to the same memory as its `past_*` input, so
GroupQueryAttention appends in place and no step copies the cache:

    slot (batch row) 0  [ K × (filled .. | free ........) × hd ]   per layer, keys and values
    slot 1              [ K × (filled ...... | free ....) × hd ]
    ...                   ▲ rows = range(a, a+B) of a forward are bound by pointer, so a step
                            may run any contiguous run of slots

`execute()` turns one scheduler step into as few forwards as the runtime allows. ONNX Runtime's
CPU GroupQueryAttention takes a batch of single-token decodes at different positions, or a batch
of first prompts (all from position 0), but a later prompt chunk only at batch 1; so a step is at
most three kinds of forward:

    decodes        one forward over range(lowest, highest decoding slot + 1); a slot in that range
                   that is not decoding rides along as a dummy row that writes one position past
                   its cached tokens (the next real write there overwrites it); a gap of more
                   than MAX_DUMMY_GAP such slots splits the decodes into two forwards
    first prompts  one forward per contiguous run of their slots (a dummy row there would write
                   a whole prompt over a running slot's cache, so runs are never padded), split
                   further where right-padding to the longest prompt would waste work
    a continuation one batch-1 forward (the scheduler runs at most one per step)

Dummy rows are rare: as requests finish, the scheduler compacts the running ones into the lowest
slots (holes that waiting requests are about to take are left to them), and the runner moves
their cache rows (`move()`) before the step's forwards.

Mixed forwards (`mixed=True`): ONNX Runtime 1.32's GroupQueryAttention has an optional input,
`query_seqlens`, each row's real tokens in a right-padded chunk; with it one forward may carry
decodes, later chunks and first prompts on different pasts (exact: tests/engine/
test_mixed_prefill.py), and a row of 0 tokens is idle. The exported graph does not take it, so
a mixed runner rewrites the graph at load (`_packed_graph`) into a packed layout: the tokens of
every row travel as one sequence [1, T] through the embedding, norms and projections, which
compute real tokens only, and only attention sees them right-padded, [B, S], through a Gather
on either side of each GroupQueryAttention:

    input_ids [1, T] ─ … ─ q|k|v [T, ·] ─ Gather(pad_idx [B, S]) ─ GQA [B, S, ·]
                           ─ Gather(pack_idx [1, T]) ─ o [1, T, ·] ─ … ─ logits_idx into T

`forward()` keeps the padded interface of every runner and packs at the call. A mixed runner
merges two neighbouring forwards of the plan above where the merged one costs less (`_cost`):
the projections cost the same tokens either way, so a merge saves a forward's own cost and pays
for the padded attention positions (each reads its row's cached keys): 8 decodes beside a
16-token chunk merge; beside a 248-token one they do not.

Dims come from the graph's inputs, so the engine needs no model code. The exporter's parity
harness (exporters/runner.py) runs the same forward, so parity is measured on what serves.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import numpy as np
import onnxruntime as ort

from engine import graph
from engine.hugepages import Advised, HugePages, advise_huge_pages, anonymous_regions
from engine.kv_memory import HostKV, trim_heap
from engine.scheduler import ScheduledChunk, SchedulerOutput

# the setting users pick → ONNX Runtime's provider list (first preferred; CPU runs what is left)
PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}
_DEVICE = {"CPUExecutionProvider": "cpu", "CUDAExecutionProvider": "cuda"}
# A decode forward carries free slots between decoding ones as dummy rows up to this many in a
# row; a longer gap splits it in two forwards. On SmolLM2-135M int4 (2 cores) a forward costs
# ~2.5 ms plus ~1.2 ms a row, so two dummy rows cost about what a second forward does.
MAX_DUMMY_GAP = 2
# First prompts batched in one forward are padded to the longest; padding beyond this share of
# their real tokens (or MIN_PADDING tokens, whichever is more) starts another forward instead.
MAX_PADDING, MIN_PADDING = 0.25, 32
_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
# GroupQueryAttention's optional input (ONNX Runtime 1.32) giving each row's number of real
# tokens in a right-padded chunk: with it, rows of different lengths on different pasts run in
# one forward, and a row of 0 tokens is idle (its cache untouched). The exported graph does not
# take it (engine/graph.py, contract 1); a runner built with mixed=True adds it at load, with
# the packed layout's two index inputs (module doc): PAD_IDX [B, S], each padded position's
# token in the packed axis (a padding position names any token: its attention output is
# dropped); PACK_IDX [1, T], each packed token's position in the flat B*S axis.
QUERY_SEQLENS = "query_seqlens"
PAD_IDX, PACK_IDX = "pad_idx", "pack_idx"
TOKENS = "tokens"  # the packed axis' symbolic dimension
_GQA_QUERY_SEQLENS = 16  # its position among GroupQueryAttention's inputs
# A forward costs about FORWARD_ROWS rows of work of its own (the same measure as MAX_DUMMY_GAP:
# ~2.5 ms + ~1.2 ms a row on SmolLM2-135M int4, 2 cores): a mixed forward replaces two only
# where its padded attention positions cost less than the forward it saves.
FORWARD_ROWS = 2
# A padded attention position reading k cached keys costs about k / PAD_KEYS_PER_ROW rows.
# Measured (benchmarks/engine_mixed.py, SmolLM2-135M int4 with a float16 cache, 2 cores, 8
# decodes at 300 cached tokens beside a chunk of n on a 512-token past): one packed forward
# took 0.66-0.77x the two apart for n = 1..32, 1.02x at n = 64 (8 x 63 padded positions
# reading ~364 keys each: ~183 k keys, 2.8 rows at this value, above FORWARD_ROWS: not merged)
# and 1.20x at 248.
PAD_KEYS_PER_ROW = 65536

# runs one forward's chunks → (request ids, their logits)
Forward = Callable[[Sequence[ScheduledChunk]], tuple[list[str], np.ndarray]]


class ProviderUnavailable(RuntimeError):
    """The chosen execution provider is not in this ONNX Runtime build (or has no device)."""


def check_provider(provider: str) -> list[str]:
    """The provider list for a setting, or ProviderUnavailable naming what this build has."""
    if provider not in PROVIDERS:
        raise ProviderUnavailable(f"provider {provider!r} is not one of {', '.join(PROVIDERS)}")
    wanted, available = PROVIDERS[provider], ort.get_available_providers()
    if wanted[0] not in available:
        raise ProviderUnavailable(
            f"provider {provider!r} needs {wanted[0]}, which this onnxruntime "
            f"{ort.__version__} does not have (it has {', '.join(available)}); install "
            f"onnxruntime-gpu on a machine with a CUDA GPU, or use provider 'cpu'"
        )
    return wanted


class StepRunner(ABC):
    """A scheduler step → the forwards that run it, over a cache of slots each holding
    `lengths[slot]` tokens. Subclasses own the graph and the cache: `forward()` (one graph call
    on a contiguous range of slots, logits back in host memory) and `move()` (compaction);
    OrtRunner here, TrtRunner in engine/trt_runner.py."""

    n_slots: int
    max_len: int
    vocab_size: int
    provider: str
    lengths: np.ndarray  # tokens cached per slot
    huge_pages = HugePages(0, 0, "the cache is not in host memory")  # engine/hugepages.py

    @property
    @abstractmethod
    def kv_bytes(self) -> int:
        """The cache's whole reservation, n_slots × max_len positions (address space on the
        host; allocated memory on a device)."""

    @property
    def kv_token_bytes(self) -> int:
        """The bytes one cached position takes, every layer and kind."""
        return self.kv_bytes // (self.n_slots * self.max_len)

    def kv_resident_bytes(self) -> int:
        """The bytes of the cache resident now (a device cache: all of it)."""
        return self.kv_bytes

    def release(self, slot: int) -> None:
        """Forgets `slot`'s cached positions and gives their memory back where the cache can
        (OrtRunner's host cache). Call it once the slot is truly free: no running request holds
        it and no cached prefix there will be reused (the scheduler says so through
        SchedulerOutput.released); the slot's next first prompt starts it from empty."""
        self.lengths[slot] = 0

    @property
    @abstractmethod
    def can_move(self) -> bool:
        """Whether move() works here (the scheduler compacts slots only then)."""

    @abstractmethod
    def forward(
        self,
        input_ids: np.ndarray,
        positions: np.ndarray,
        seqlens_k: np.ndarray,
        logits_idx: np.ndarray,
        rows: range | None = None,
    ) -> np.ndarray:
        """One graph call: ids/positions [B, S] (right-padded), seqlens_k [B] (each row's total
        length - 1 after the step), logits_idx [N] into the flat B*S axis → logits [N, V] on the
        host. `rows` are the cache slots of the B batch rows, a contiguous range (default
        0..B-1). The logits may be a view of a buffer the next forward overwrites."""

    def move(self, src: int, dst: int, n_tokens: int) -> None:
        """Copies slot `src`'s first n_tokens cached positions to slot `dst` (compaction)."""
        if not (0 <= src < self.n_slots and 0 <= dst < self.n_slots and n_tokens <= self.max_len):
            raise ValueError(f"move {src} → {dst} of {n_tokens} tokens is outside the cache")
        self._copy_rows(src, dst, n_tokens)
        self.lengths[dst] = n_tokens
        self.release(src)  # its positions live in dst now

    def copy(self, src: int, dst: int, n_tokens: int) -> None:
        """Copies slot `src`'s first n_tokens cached positions to slot `dst`, which starts with
        them; `src` keeps its own (prefix caching: a cached prefix serves several requests)."""
        if not (0 <= src < self.n_slots and 0 <= dst < self.n_slots and n_tokens <= self.max_len):
            raise ValueError(f"copy {src} → {dst} of {n_tokens} tokens is outside the cache")
        self._copy_rows(src, dst, n_tokens)
        self.lengths[dst] = n_tokens

    @abstractmethod
    def _copy_rows(self, src: int, dst: int, n_tokens: int) -> None:
        """The cache copy behind move(), every layer and kind."""

    def reset(self) -> None:
        """Forgets every slot's tokens and gives their memory back (release())."""
        for slot in range(self.n_slots):
            self.release(slot)

    def _check_forward(self, B: int, S: int, rows: range | None, total: int) -> range:
        """The slots of a forward (default 0..B-1), checked with its total length."""
        rows = range(B) if rows is None else rows
        if len(rows) != B or rows.step != 1 or rows.start < 0 or rows.stop > self.n_slots:
            raise ValueError(
                f"rows={rows} must be a contiguous range of {B} slots in 0..{self.n_slots - 1}"
            )
        if not S <= total <= self.max_len:
            raise ValueError(f"total length {total} must be in S={S}..max_len={self.max_len}")
        return rows

    def execute(self, step: SchedulerOutput) -> tuple[list[str], np.ndarray]:
        """Runs a step's chunks → (request ids, their logits [n, V]) for the chunks that sample,
        in the order of the ids. Aborted requests' slots need nothing: a slot's next first
        prompt starts it from empty.

        The logits may be a view of the runner's output buffer, valid until the next forward:
        a step with one forward (the common case) copies nothing."""
        for slot in step.released:  # first: a freed slot may be a move's destination
            self.release(slot)
        for m in step.moves:  # before any forward: the chunks name the slots after the moves
            self.move(m.src, m.dst, m.n_tokens)
        for c in step.copies:  # cached prefixes, named after the moves
            self.copy(c.src, c.dst, c.n_tokens)
        forwards = [partial(run, group) for run, group in self._forwards(step)]
        if len(forwards) == 1:
            return forwards[0]()
        ids: list[str] = []
        parts: list[np.ndarray] = []
        for forward in forwards:
            run_ids, logits = forward()
            ids += run_ids
            parts.append(logits.copy())  # the next forward may reuse the output buffer
        if not parts:
            return [], np.empty((0, self.vocab_size), np.float32)
        return ids, np.concatenate(parts)

    def _forwards(self, step: SchedulerOutput) -> list[tuple[Forward, list[ScheduledChunk]]]:
        """The step's chunks grouped into forwards, each (how it runs, its chunks)."""
        return [
            *((self._decode, run) for run in _runs(step.decodes, MAX_DUMMY_GAP)),
            *(
                (self._prefill, part)
                for run in _contiguous(step.prefills)
                for part in _padding_bounded(run)
            ),
            *((self._continue, [chunk]) for chunk in step.continuations),
        ]

    def _decode(self, decodes: Sequence[ScheduledChunk]) -> tuple[list[str], np.ndarray]:
        if decodes[-1].slot - decodes[0].slot + 1 == len(decodes):  # sorted, no idle row
            return [c.request_id for c in decodes], self._decode_slots(decodes)
        by_slot = {c.slot: c for c in decodes}
        lo, hi = min(by_slot), max(by_slot)
        B = hi - lo + 1
        ids = np.zeros((B, 1), np.int64)
        # a dummy row writes one position past what its slot holds (see the module doc)
        pos = np.minimum(self.lengths[lo : hi + 1], self.max_len - 1)
        keep = self.lengths[lo : hi + 1].copy()
        slots = sorted(by_slot)
        for slot in slots:
            chunk = by_slot[slot]
            ids[slot - lo, 0], pos[slot - lo] = chunk.token_ids[0], chunk.start
        rows = np.asarray(slots) - lo
        logits = self.forward(ids, pos[:, None], pos, rows, range(lo, hi + 1))
        if len(slots) != B:  # dummy rows did not gain a token
            dummy = np.ones(B, bool)
            dummy[rows] = False
            self.lengths[lo : hi + 1][dummy] = keep[dummy]
        return [by_slot[s].request_id for s in slots], logits

    def _decode_slots(self, decodes: Sequence[ScheduledChunk]) -> np.ndarray:
        """One token for each of the decodes, which hold consecutive slots from decodes[0]'s:
        logits [B, V]. The steady state of serving: every step of every stream runs this."""
        lo, B = decodes[0].slot, len(decodes)
        ids = np.array([c.token_ids for c in decodes], np.int64)
        pos = np.array([c.start for c in decodes], np.int64)
        return self.forward(ids, pos[:, None], pos, np.arange(B), range(lo, lo + B))

    def _prefill(self, run: list[ScheduledChunk]) -> tuple[list[str], np.ndarray]:
        lens = np.array([c.n_tokens for c in run])
        B, S = len(run), int(lens.max())
        ids = np.zeros((B, S), np.int64)
        for r, c in enumerate(run):
            ids[r, : c.n_tokens] = c.token_ids
        positions = np.broadcast_to(np.arange(S), (B, S))
        sampling = [r for r, c in enumerate(run) if c.sample]
        # a chunk that does not sample still needs one logits row for the graph's shape
        last = np.arange(B) * S + lens - 1
        logits = self.forward(ids, positions, lens - 1, last, range(run[0].slot, run[-1].slot + 1))
        if len(sampling) == B:
            return [c.request_id for c in run], logits
        return [run[r].request_id for r in sampling], logits[sampling]

    def _continue(self, chunks: Sequence[ScheduledChunk]) -> tuple[list[str], np.ndarray]:
        """A batch-1 forward on the chunk's past. A decode with a draft asks logits for its
        last 1 + draft positions, one row each under its id (engine/speculative.py)."""
        (chunk,) = chunks
        n, start, k = chunk.n_tokens, chunk.start, chunk.draft
        ids = np.asarray([chunk.token_ids], np.int64)
        positions = np.arange(start, start + n)[None]
        rows = range(chunk.slot, chunk.slot + 1)
        wanted = np.arange(n - 1 - k, n)
        logits = self.forward(ids, positions, np.array([start + n - 1]), wanted, rows)
        return ([chunk.request_id] * (k + 1), logits) if chunk.sample else ([], logits[:0])


class OrtRunner(StepRunner):
    """Owns the session, the KV cache and each slot's cached length."""

    def __init__(
        self,
        path: str | Path,
        n_slots: int,
        max_len: int,
        *,
        threads: int | None = None,
        provider: str = "cpu",
        spin_wait: bool = True,
        huge_pages: bool = True,
        mixed: bool = False,
    ):
        if n_slots < 1:
            raise ValueError(f"n_slots={n_slots} must be >= 1")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
        # spinning worker threads answer the next parallel section sooner but hold their cores
        # between forwards, from the Python of the step and from anything else on the machine
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin_wait else "0")
        # activations from the C heap, not ONNX Runtime's CPU arena: the arena keeps the most a
        # batched prefill ever took (~100 MiB at 32 slots) and never gives it back; the heap's
        # free pages go back when the engine is idle (release()). Decode speed unchanged
        # (docs/engine.md, "Memory and cold start")
        opts.enable_cpu_mem_arena = False
        providers = check_provider(provider)
        before = anonymous_regions() if huge_pages else set()
        model = _packed_graph(Path(path), opts) if mixed else str(path)
        self.session = ort.InferenceSession(model, opts, providers=providers)
        self.provider = self.session.get_providers()[0]
        self.device = _DEVICE.get(self.provider, "cuda")
        meta = self.session.get_modelmeta().custom_metadata_map
        # before any name is looked up: another contract may name or mean its inputs otherwise
        graph.check_version(graph.graph_version(meta), str(path))

        inputs = {i.name: i for i in self.session.get_inputs()}
        self.mixed = QUERY_SEQLENS in inputs  # one forward may mix chunks of any shape
        past = inputs[graph.past_name(graph.KEY, 0)]
        n_layers = graph.count_layers(inputs)
        self.kv_dtype = _DTYPES[past.type]
        _, n_kv_heads, capacity, head_dim = past.shape
        # a symbolic cache length (ORT flavour) takes max_len; a fixed one (portable) is kept
        graph_len = capacity if isinstance(capacity, int) else _graph_max_len(meta)
        if not 1 <= max_len <= graph_len:
            raise ValueError(f"max_len={max_len} must be in 1..{graph_len}, the graph's max_len")
        capacity = capacity if isinstance(capacity, int) else max_len
        self.n_slots, self.max_len, self.n_layers = n_slots, max_len, n_layers
        self.vocab_size = _vocab_size(self.session)
        self._row_shape = (n_kv_heads, capacity, head_dim)
        self._row_bytes = int(np.prod(self._row_shape)) * np.dtype(self.kv_dtype).itemsize
        self._cache_names = graph.cache_names(n_layers)  # (past, present) pairs
        # the prepacked weights on 2 MiB pages (engine/hugepages.py), advised before the cache
        # is mapped (collapsing it would make every position resident), collapsed after the
        # first forward (_collapse_huge_pages)
        self._advised: Advised | None = None
        self._collapser: threading.Thread | None = None
        if not huge_pages:
            self.huge_pages = HugePages(0, 0, "turned off")
        elif self.device == "cpu":
            self._advised = advise_huge_pages(before)
            self.huge_pages = self._advised.report
        self._host_kv: HostKV | None = None
        self._device_kv: dict[str, ort.OrtValue] = {}  # a device cache, by past name
        if self.device == "cpu":  # resident only where written, released per slot
            past_names = [past for past, _ in self._cache_names]
            self._host_kv = HostKV(past_names, n_slots, self._row_shape, self.kv_dtype)
            self._kv_ptr = {name: self._host_kv.pointer(name) for name in past_names}
        else:  # zeroed once, so that no position ever reads uninitialised device memory
            shape = (n_slots, *self._row_shape)
            zeros = np.zeros(shape, dtype=self.kv_dtype)
            for name, _ in self._cache_names:
                value = ort.OrtValue.ortvalue_from_shape_and_type(
                    shape, self.kv_dtype, self.device, 0
                )
                value.update_inplace(zeros)
                self._device_kv[name] = value
            self._kv_ptr = {name: v.data_ptr() for name, v in self._device_kv.items()}
        self.binding = self.session.io_binding()
        self._bound_rows: tuple[int, int] | None = None  # (first slot, B) the KV is bound for
        self._inputs: dict[tuple[int, ...], _Inputs] = {}  # decode shapes, by (B, 1, N, T)
        self._bound_inputs: _Inputs | None = None
        self._logits = np.empty((0, self.vocab_size), dtype=np.float32)
        self.lengths = np.zeros(n_slots, dtype=np.int64)  # tokens cached per slot
        self._lengths_view = memoryview(self.lengths)  # item writes without numpy

    @property
    def kv_bytes(self) -> int:
        return self._row_bytes * self.n_slots * len(self._cache_names)

    @property
    def kv_token_bytes(self) -> int:
        return self._row_bytes // self._row_shape[1] * len(self._cache_names)

    def kv_resident_bytes(self) -> int:
        if self._host_kv is None:
            return self.kv_bytes
        return self._host_kv.resident_bytes()

    def release(self, slot: int) -> None:
        super().release(slot)
        if self._host_kv is not None:
            self._host_kv.release(slot)
            if not self.lengths.any():  # the engine holds no tokens: idle, or about to be
                trim_heap()

    @property
    def can_move(self) -> bool:
        return self._host_kv is not None  # a host cache: see __init__

    def _copy_rows(self, src: int, dst: int, n_tokens: int) -> None:
        """A numpy copy: about 46 KB a token for SmolLM2-135M, ~1 ms for a 200-token row, where
        each idle row a decode forward would otherwise carry costs a row's compute every step."""
        if self._host_kv is None:
            raise RuntimeError(f"slots cannot move on {self.provider}: the cache is on the device")
        for array in self._host_kv.arrays.values():
            array[dst, :, :n_tokens] = array[src, :, :n_tokens]

    def forward(
        self,
        input_ids: np.ndarray,
        positions: np.ndarray,
        seqlens_k: np.ndarray,
        logits_idx: np.ndarray,
        rows: range | None = None,
        query_seqlens: np.ndarray | None = None,
    ) -> np.ndarray:
        """StepRunner.forward: the rows' cache buffers are bound by pointer offset, so no slot
        is copied. `query_seqlens` [B], each row's real tokens (0: an idle row), needs a runner
        built with mixed=True; by default a row's are min(S, its total length). A mixed runner
        computes only those: it packs them here (module doc); a logits_idx on a padding
        position reads the row of the real token before it."""
        B, S = input_ids.shape
        seqlens_k = np.ascontiguousarray(seqlens_k, dtype=np.int32)
        total = max(int(seqlens_k.max()) + 1, S)
        rows = self._check_forward(B, S, rows, total)
        if not self.mixed:
            if query_seqlens is not None:
                raise ValueError("query_seqlens needs a runner built with mixed=True")
            arrays = self._bind(B, S, len(logits_idx), rows.start).arrays
            arrays[graph.INPUT_IDS][...] = input_ids
            arrays[graph.LOGITS_IDX][...] = logits_idx
        else:  # the packed layout (module doc): only each row's first `real` tokens are computed
            real = np.minimum(S, seqlens_k + 1) if query_seqlens is None else query_seqlens
            real = np.asarray(real, np.int32)
            flat = (np.arange(S) < real[:, None]).ravel()
            tokens = np.flatnonzero(flat)
            if not len(tokens):
                raise ValueError("query_seqlens must give at least one row a token")
            packed_at = np.maximum(np.cumsum(flat) - 1, 0)  # a position's token in the packed axis
            arrays = self._bind(B, S, len(logits_idx), rows.start, len(tokens)).arrays
            arrays[graph.INPUT_IDS][0] = np.asarray(input_ids).ravel()[tokens]
            arrays[PAD_IDX][...] = packed_at.reshape(B, S)
            arrays[PACK_IDX][0] = tokens
            arrays[QUERY_SEQLENS][...] = real
            arrays[graph.LOGITS_IDX][...] = packed_at[logits_idx]
        arrays[graph.POSITION_IDS][...] = positions
        arrays[graph.SEQLENS_K][...] = seqlens_k
        arrays[graph.TOTAL_SEQUENCE_LENGTH][...] = total
        self.session.run_with_iobinding(self.binding)
        self.lengths[rows.start : rows.stop] = seqlens_k + 1
        if self._advised is not None:
            self._collapse_huge_pages()
        return self._logits

    def _collapse_huge_pages(self) -> None:
        """After the first forward (a cold start's first token is out of it), the weights'
        resident pages are collapsed to huge pages on a thread of its own: the kernel copies
        them, without the GIL, while the engine serves on."""
        advised, self._advised = self._advised, None

        def collapse() -> None:
            self.huge_pages = advised.collapse()

        self._collapser = threading.Thread(target=collapse, name="huge-pages", daemon=True)
        self._collapser.start()

    def _decode_slots(self, decodes: Sequence[ScheduledChunk]) -> np.ndarray:
        """StepRunner._decode_slots without numpy: the inputs are written as Python ints through
        memoryviews of the bound arrays. Right after a forward has streamed the weights through
        the caches, each numpy call costs 10-30 µs (its code and data are cold), and a batch-1
        decode made about fifteen of them; this saves ~90 µs of a ~8 ms int4 step (1%)."""
        lo, B = decodes[0].slot, len(decodes)
        longest = max(c.start for c in decodes) + 1
        self._check_forward(B, 1, range(lo, lo + B), longest)
        # a mixed runner's packed inputs for B single tokens are set once (_Inputs): the
        # identity, one token a row
        ids, positions, seqlens_k, total, logits_idx = self._bind(B, 1, B, lo, B).views
        for i, c in enumerate(decodes):
            ids[i] = c.token_ids[0]
            positions[i] = seqlens_k[i] = c.start
            logits_idx[i] = i
        total[()] = longest
        self.session.run_with_iobinding(self.binding)
        lengths = self._lengths_view
        for i, c in enumerate(decodes):
            lengths[lo + i] = c.start + 1
        return self._logits

    def _forwards(self, step: SchedulerOutput) -> list[tuple[Forward, list[ScheduledChunk]]]:
        """StepRunner._forwards, then, on a mixed runner, neighbouring forwards (by slot) merged
        into one packed forward wherever that costs less (`_cost`): decodes with a
        prompt chunk on a past, first prompts with later chunks, runs apart by a few slots."""
        planned = super()._forwards(step)
        if not self.mixed or len(planned) < 2:
            return planned
        groups = sorted((chunks for _, chunks in planned), key=lambda g: min(c.slot for c in g))
        merged: list[list[ScheduledChunk]] = [groups[0]]
        for group in groups[1:]:
            together = merged[-1] + group
            if self._cost(together) < self._cost(merged[-1]) + self._cost(group):
                merged[-1] = together
            else:
                merged.append(group)
        if len(merged) == len(planned):
            return planned
        by_group = {id(chunks): run for run, chunks in planned}
        return [(by_group.get(id(g), self._mixed), g) for g in merged]

    def _cost(self, chunks: Sequence[ScheduledChunk]) -> float:
        """A packed forward's work in rows: FORWARD_ROWS, a row per real token, and the padded
        attention positions (idle rows' too), each reading its row's past and the chunk's S
        keys, at PAD_KEYS_PER_ROW keys a row; infinite where a row's past + S passes the
        cache."""
        lo = min(c.slot for c in chunks)
        hi = max(c.slot for c in chunks)
        S = max(c.n_tokens for c in chunks)
        past = self.lengths[lo : hi + 1].copy()
        real = np.zeros(hi - lo + 1, np.int64)
        for c in chunks:
            past[c.slot - lo], real[c.slot - lo] = c.start, c.n_tokens
        if int(past.max()) + S > self.max_len:
            return float("inf")
        padded_keys = int(((S - real) * (past + S)).sum())
        return FORWARD_ROWS + int(real.sum()) + padded_keys / PAD_KEYS_PER_ROW

    def _mixed(self, chunks: Sequence[ScheduledChunk]) -> tuple[list[str], np.ndarray]:
        """One forward over the slots lo..hi of `chunks`, whatever their kinds: row r carries
        its chunk's tokens right-padded to the longest (forward() packs them), on its past; a
        slot in the range with no chunk is an idle row (0 tokens: its cache and length
        unchanged)."""
        by_slot = {c.slot: c for c in chunks}
        lo, hi = min(by_slot), max(by_slot)
        B, S = hi - lo + 1, max(c.n_tokens for c in chunks)
        keep = self.lengths[lo : hi + 1].copy()
        past, real = keep.copy(), np.zeros(B, np.int32)
        ids = np.zeros((B, S), np.int64)
        ids_out: list[str] = []
        wanted: list[int] = []
        for slot in sorted(by_slot):
            c, r = by_slot[slot], slot - lo
            ids[r, : c.n_tokens], past[r], real[r] = c.token_ids, c.start, c.n_tokens
            if c.sample:  # a decode with a draft: its last 1 + draft positions
                wanted += range(r * S + c.n_tokens - 1 - c.draft, r * S + c.n_tokens)
                ids_out += [c.request_id] * (c.draft + 1)
        positions = past[:, None] + np.arange(S)  # padding continues its row (P + S <= max_len)
        # an idle row of an empty slot reads one position and writes none
        seqlens_k = np.maximum(past + real - 1, 0)
        logits_idx = np.asarray(wanted or [0], np.int64)  # the graph returns at least one row
        logits = self.forward(ids, positions, seqlens_k, logits_idx, range(lo, hi + 1), real)
        idle = real == 0
        self.lengths[lo : hi + 1][idle] = keep[idle]
        return (ids_out, logits) if wanted else ([], logits[:0])

    def _bind(self, B: int, S: int, N: int, first_slot: int, T: int = 0) -> _Inputs:
        """Binds the inputs of a (B, S) forward sampling N rows (on a mixed runner, of T real
        tokens), the KV rows of slots first_slot .. first_slot + B - 1 and a logits buffer,
        each only where the last forward bound something else; returns the inputs for the
        caller to fill."""
        b = self.binding
        key = (B, S, N, T if self.mixed else 0)
        inputs = self._inputs.get(key)
        if inputs is None:  # decode shapes are bound once; a step only writes into them
            inputs = _Inputs(*key, mixed=self.mixed)
            # prompt shapes vary too much to keep; a mixed runner's one-token shapes are at
            # most (B, T <= B) pairs, merged decode runs around idle rows among them
            if S == 1:
                self._inputs[key] = inputs
        if inputs is not self._bound_inputs:
            for name, value in inputs.ortvalues.items():
                b.bind_ortvalue_input(name, value)
            self._bound_inputs = inputs
        if (first_slot, B) != self._bound_rows:  # rebinding 2L buffers costs ~5% of a step
            shape = (B, *self._row_shape)
            offset = first_slot * self._row_bytes
            for past, present in self._cache_names:
                ptr = self._kv_ptr[past] + offset
                b.bind_input(past, self.device, 0, self.kv_dtype, shape, ptr)
                b.bind_output(present, self.device, 0, self.kv_dtype, shape, ptr)
            self._bound_rows = (first_slot, B)
        if self._logits.shape[0] != N:  # a preallocated output: no allocation per decode step
            self._logits = np.empty((N, self.vocab_size), dtype=np.float32)
            b.bind_ortvalue_output(graph.LOGITS, ort.OrtValue.ortvalue_from_numpy(self._logits))
        return inputs


class _Inputs:
    """The graph's small inputs for one (B, S, N) shape (on a mixed runner, of T packed
    tokens), as numpy arrays shared with the OrtValues bound to them: a step writes values in
    place and binds nothing (binding five arrays, eight on a mixed runner, each step costs
    ~0.15 ms, 1–2% of a batch-1 decode step)."""

    def __init__(self, B: int, S: int, N: int, T: int = 0, mixed: bool = False):
        self.arrays = {
            graph.INPUT_IDS: np.zeros((1, T) if mixed else (B, S), np.int64),
            graph.POSITION_IDS: np.zeros((B, S), np.int64),
            graph.SEQLENS_K: np.zeros(B, np.int32),
            graph.TOTAL_SEQUENCE_LENGTH: np.zeros((), np.int32),
            graph.LOGITS_IDX: np.zeros(N, np.int64),
        }
        # the same memory, flat, in the order above: OrtRunner._decode_slots writes through it
        self.views = tuple(memoryview(v.reshape(-1) if v.ndim else v) for v in self.arrays.values())
        if mixed:  # B single tokens (a decode shape) pack as themselves: set here, once
            one_each = S == 1 and T == B
            self.arrays[QUERY_SEQLENS] = np.full(B, 1 if one_each else 0, np.int32)
            self.arrays[PAD_IDX] = np.arange(B, dtype=np.int64)[:, None].repeat(S, 1)
            self.arrays[PACK_IDX] = np.arange(T, dtype=np.int64)[None]
        self.ortvalues = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in self.arrays.items()}


def _packed_graph(path: Path, opts: ort.SessionOptions) -> bytes:
    """The graph at `path` in the packed layout (module doc), serialized: input_ids [1, T];
    QUERY_SEQLENS [B], PAD_IDX [B, S] and PACK_IDX [1, T] added as inputs; each
    GroupQueryAttention's q|k|v gathered into [B, S] before it and its output packed back
    after it. The weights stay in their external file, which `opts` is pointed at."""
    import onnx  # deferred: onnx parses the graph only for a mixed runner
    from onnx import TensorProto, helper  # deferred with onnx, above

    model = onnx.load(str(path), load_external_data=False)
    g = model.graph
    if not any(n.op_type == "GroupQueryAttention" for n in g.node):
        raise ValueError(f"{path} has no GroupQueryAttention node to take {QUERY_SEQLENS}")
    ids = next(i for i in g.input if i.name == graph.INPUT_IDS)
    ids.CopyFrom(helper.make_tensor_value_info(graph.INPUT_IDS, TensorProto.INT64, [1, TOKENS]))
    g.input.extend(
        [
            helper.make_tensor_value_info(QUERY_SEQLENS, TensorProto.INT32, [graph.BATCH]),
            helper.make_tensor_value_info(PAD_IDX, TensorProto.INT64, [graph.BATCH, graph.SEQ]),
            helper.make_tensor_value_info(PACK_IDX, TensorProto.INT64, [1, TOKENS]),
        ]
    )
    nodes = []
    for node in g.node:
        if node.op_type != "GroupQueryAttention":
            nodes.append(node)
            continue
        x, y, name = node.input[0], node.output[0], node.name
        # q|k|v [1, T, ·] → [T, ·] → [B, S, ·]; the output [B, S, ·] → [B*S, ·] → [1, T, ·]
        nodes.append(helper.make_node("Flatten", [x], [f"{x}.tokens"], f"{name}.flat_in", axis=2))
        nodes.append(
            helper.make_node("Gather", [f"{x}.tokens", PAD_IDX], [f"{x}.padded"], f"{name}.pad")
        )
        node.input[0] = f"{x}.padded"
        node.input.extend([""] * (_GQA_QUERY_SEQLENS - len(node.input)) + [QUERY_SEQLENS])
        node.output[0] = f"{y}.padded"
        nodes.append(node)
        nodes.append(
            helper.make_node("Flatten", [f"{y}.padded"], [f"{y}.rows"], f"{name}.flat_out", axis=2)
        )
        nodes.append(helper.make_node("Gather", [f"{y}.rows", PACK_IDX], [y], f"{name}.pack"))
    del g.node[:]
    g.node.extend(nodes)
    folder = "session.model_external_initializers_file_folder_path"
    opts.add_session_config_entry(folder, str(path.parent))
    return model.SerializeToString()


def _padding_bounded(run: list[ScheduledChunk]) -> list[list[ScheduledChunk]]:
    """A run of first prompts → consecutive parts, each one right-padded forward whose padding
    stays within MAX_PADDING of its real tokens: a batch is padded to its longest prompt, and
    one long prompt among short ones would multiply the step's work (7 prompts of 16 tokens
    with one of 121 compute 847 positions for 217 tokens)."""
    parts: list[list[ScheduledChunk]] = []
    for c in run:
        if parts:
            part = parts[-1]
            longest = max(c.n_tokens, max(x.n_tokens for x in part))
            real = c.n_tokens + sum(x.n_tokens for x in part)
            if longest * (len(part) + 1) - real <= max(MIN_PADDING, MAX_PADDING * real):
                part.append(c)
                continue
        parts.append([c])
    return parts


def _contiguous(chunks: Sequence[ScheduledChunk]) -> list[list[ScheduledChunk]]:
    return _runs(chunks, 0)


def _runs(chunks: Sequence[ScheduledChunk], max_gap: int) -> list[list[ScheduledChunk]]:
    """Chunks → runs, by slot, whose slots are at most `max_gap` free slots apart."""
    runs: list[list[ScheduledChunk]] = []
    for c in sorted(chunks, key=lambda c: c.slot):
        if runs and c.slot - runs[-1][-1].slot - 1 <= max_gap:
            runs[-1].append(c)
        else:
            runs.append([c])
    return runs


def _graph_max_len(meta: dict[str, str]) -> int:
    if graph.MAX_LEN_KEY in meta:
        return int(meta[graph.MAX_LEN_KEY])
    raise ValueError(f"the graph states no max_len in its metadata ({graph.MAX_LEN_KEY})")


def _vocab_size(session: ort.InferenceSession) -> int:
    logits = next(o for o in session.get_outputs() if o.name == graph.LOGITS)
    if isinstance(logits.shape[-1], int):
        return logits.shape[-1]
    raise ValueError(f"the graph's logits have no fixed vocabulary size: {logits.shape}")
