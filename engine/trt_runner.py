"""Runs a TensorRT plan (the portable engine graph, built by exporters/tensorrt.py) on CUDA
through the TensorRT runtime: the steps of OrtRunner (runner.StepRunner) over another graph call.

The cache is one torch CUDA tensor per past input, [n_slots, K, max_len, hd], allocated once.
A forward on slots range(a, a+B) binds the slice cache[a:a+B] by address (a contiguous slice of
a contiguous tensor) for both `past_*` and `present_*`, so the plan writes each step's new
positions into the cache and nothing is copied; `in_place=False` binds present to a scratch
buffer and copies it back instead, for a TensorRT version whose aliased write is found wrong
(TensorRT documents aliasing only for its own KV-cache layer; the GPU tests check both).

The plan has two optimization profiles (prefill: B × S, decode: B × 1); a forward picks the one
for its shape. Logits come back to the host for the sampler: N × V float32 per step.

torch allocates the device memory (TensorRT needs addresses, not a framework), so a TensorRT
target needs a CUDA build of torch as well as `tensorrt`; both are imported on first use only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from engine import graph
from engine.runner import ProviderUnavailable, StepRunner

INSTALL_HINT = (
    "`pip install tensorrt` on a machine with an NVIDIA GPU and driver (and a CUDA build of torch)"
)
PREFILL, DECODE = 0, 1  # the plan's optimization profiles, in the order the builder adds them


def load_tensorrt():
    """The `tensorrt` module, or ProviderUnavailable saying what is missing."""
    try:
        # tensorrt and torch (CUDA build): optional, installed only on GPU nodes
        import tensorrt as trt
        import torch  # torch: it allocates the device memory TensorRT binds
    except ImportError as e:
        raise ProviderUnavailable(f"TensorRT targets need {e.name or e}: {INSTALL_HINT}") from None
    if not torch.cuda.is_available():
        raise ProviderUnavailable(
            f"TensorRT needs a CUDA device and torch sees none; {INSTALL_HINT}"
        )
    return trt


def check_plan(plan_trt: str | None, plan_arch: str | None, trt: str, arch: str) -> None:
    """A plan deserializes only on the TensorRT version (to the build number) and the GPU
    architecture that built it; the manifest records both."""
    if plan_trt and plan_trt != trt:
        raise ProviderUnavailable(
            f"the plan was built by TensorRT {plan_trt}; this machine has {trt} (rebuild the "
            "target here with `aimass export`)"
        )
    if plan_arch and plan_arch != arch:
        raise ProviderUnavailable(
            f"the plan was built for GPU architecture {plan_arch}; this GPU is {arch} (rebuild "
            "the target here with `aimass export`)"
        )


def device_arch() -> str:
    import torch  # torch: optional, deferred to GPU nodes (see load_tensorrt)

    major, minor = torch.cuda.get_device_capability()
    return f"sm{major}{minor}"


class TrtRunner(StepRunner):
    def __init__(self, path: str | Path, n_slots: int, max_len: int, *, in_place: bool = True):
        trt = load_tensorrt()
        import torch  # torch: optional, deferred to GPU nodes (load_tensorrt checked it)

        self._torch = torch
        torch.cuda.current_device()  # CUDA is initialised before TensorRT uses its context
        self._logger = trt.Logger(trt.Logger.WARNING)
        engine = trt.Runtime(self._logger).deserialize_cuda_engine(Path(path).read_bytes())
        if engine is None:
            raise ProviderUnavailable(
                f"{path}: TensorRT {trt.__version__} cannot load this plan (built by another "
                "TensorRT version or for another GPU?)"
            )
        self.engine, self.context = engine, engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = {n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT}
        self._dynamic = {n for n in self.inputs if -1 in tuple(engine.get_tensor_shape(n))}
        torch_dtypes = {
            trt.float32: torch.float32,
            trt.float16: torch.float16,
            trt.int32: torch.int32,
            trt.int64: torch.int64,
            trt.bool: torch.bool,
        }
        self._dtypes = {n: torch_dtypes[engine.get_tensor_dtype(n)] for n in names}
        self.pairs = graph.cache_names(graph.count_layers(self.inputs))
        missing = [n for pair in self.pairs for n in pair if n not in names]
        if not self.pairs or missing:
            lacks = ", ".join(missing) or graph.past_name(graph.KEY, 0)
            raise ValueError(
                f"{path}: the plan has no {lacks} tensor: it was not built from an engine graph "
                f"of contract version {graph.GRAPH_VERSION}"
            )
        _, K, M, hd = engine.get_tensor_shape(self.pairs[0][0])
        self.plan_max_batch = int(engine.get_tensor_profile_shape(self.pairs[0][0], DECODE)[2][0])
        if not 1 <= max_len <= M:
            raise ValueError(f"max_len={max_len} must be in 1..{M}, the plan's max_len")
        if not 1 <= n_slots <= self.plan_max_batch:
            raise ValueError(
                f"n_slots={n_slots} must be in 1..{self.plan_max_batch}, the most rows the plan's "
                "profiles accept (a decode forward may hold every slot)"
            )
        row_bytes = K * M * hd * torch.empty((), dtype=self._dtypes[self.pairs[0][0]]).itemsize
        if row_bytes % 256:  # a forward binds rows from any slot; TensorRT wants aligned addresses
            raise ValueError(
                f"a cache slot of {row_bytes} bytes (K={K} × max_len={M} × hd={hd}) is not a "
                "multiple of the 256 bytes TensorRT aligns tensor addresses to; export the plan "
                "with a max_len that is a multiple of 64"
            )
        self.n_slots, self.max_len, self.in_place = n_slots, max_len, in_place
        self.provider = "tensorrt"
        self.vocab_size = int(engine.get_tensor_shape(graph.LOGITS)[1])
        self.cache = {
            p: torch.zeros((n_slots, K, M, hd), dtype=self._dtypes[p], device="cuda")
            for p, _ in self.pairs
        }
        self._scratch = (
            None if in_place else {p: torch.empty_like(t) for p, t in self.cache.items()}
        )
        self.lengths = np.zeros(n_slots, dtype=np.int64)
        self._profile: int | None = None
        # a stream of its own: TensorRT synchronises more around the legacy default stream
        self._stream = torch.cuda.Stream()
        torch.cuda.synchronize()  # the cache was zeroed on the default stream

    @property
    def kv_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.cache.values())

    @property
    def can_move(self) -> bool:
        return True  # a device-to-device copy of the row's prefix

    def _copy_rows(self, src: int, dst: int, n_tokens: int) -> None:
        with self._torch.cuda.stream(self._stream):
            for t in self.cache.values():
                t[dst, :, :n_tokens].copy_(t[src, :, :n_tokens])

    def forward(
        self,
        input_ids: np.ndarray,
        positions: np.ndarray,
        seqlens_k: np.ndarray,
        logits_idx: np.ndarray,
        rows: range | None = None,
    ) -> np.ndarray:
        input_ids = np.asarray(input_ids)
        B, S = input_ids.shape
        seqlens = np.asarray(seqlens_k, dtype=np.int32)
        total = int(seqlens.max()) + 1
        rows = self._check_forward(B, S, rows, total)
        with self._torch.cuda.stream(self._stream):
            logits = self._run(input_ids, positions, seqlens, logits_idx, rows, total)
            out = logits.float().cpu().numpy()  # waits for the stream
        self.lengths[rows.start : rows.stop] = seqlens + 1
        return out

    def _run(self, input_ids, positions, seqlens, logits_idx, rows: range, total: int):
        torch = self._torch
        S = input_ids.shape[1]
        host = {
            graph.INPUT_IDS: input_ids,
            graph.POSITION_IDS: np.asarray(positions),
            graph.SEQLENS_K: seqlens,
            graph.TOTAL_SEQUENCE_LENGTH: np.array(total, dtype=np.int32),
            graph.LOGITS_IDX: np.asarray(logits_idx),
        }
        feeds = {  # host arrays → device tensors of the plan's dtypes
            n: torch.as_tensor(np.ascontiguousarray(v)).to("cuda", self._dtypes[n])
            for n, v in host.items()
            if n in self.inputs
        }
        stream = self._stream.cuda_stream
        profile = DECODE if S == 1 else PREFILL
        if profile != self._profile:
            self.context.set_optimization_profile_async(profile, stream)
            self._profile = profile
        logits = torch.empty(
            (len(logits_idx), self.vocab_size), dtype=self._dtypes[graph.LOGITS], device="cuda"
        )
        binds = [*feeds.items(), (graph.LOGITS, logits)]
        for past, present in self.pairs:
            view = self.cache[past][rows.start : rows.stop]  # contiguous: nothing is copied
            out = view if self.in_place else self._scratch[past][rows.start : rows.stop]
            binds += [(past, view), (present, out)]
        for name, tensor in binds:
            if name in self._dynamic and not self.context.set_input_shape(name, tensor.shape):
                raise ValueError(f"{name} shape {tuple(tensor.shape)} is outside profile {profile}")
            self.context.set_tensor_address(name, tensor.data_ptr())
        if not self.context.execute_async_v3(stream):
            raise RuntimeError("TensorRT execute_async_v3 failed (see its log above)")
        if not self.in_place:
            for past, _ in self.pairs:
                self.cache[past][rows.start : rows.stop].copy_(
                    self._scratch[past][rows.start : rows.stop]
                )
        return logits
