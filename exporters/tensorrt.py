"""TensorRT plans from the portable graph, and a decoder that runs them on CUDA.

The plan is built with two optimization profiles (serving.md §3.5), because TensorRT tunes its
kernels for one shape per profile and a KV decoder runs two very different ones:

    profile 0  prefill  input_ids B x 1 .. B x max_len, opt at a typical prompt, one row
    profile 1  decode   input_ids B x 1, opt at a full batch

Precision comes from the graph, not from builder flags: TensorRT 11 removed the weakly typed
flags (BuilderFlag.FP16 and friends), so the network is created strongly typed and an fp16 plan
is built from the portable graph exported with dtype="float16" (its norms, rotary and softmax
stay float32 there). A plan runs only on the TensorRT version and GPU architecture that built
it; build_engine returns both for the manifest.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import onnx
import torch

from exporters.errors import ExportError
from exporters.portable import FLAVOUR

INSTALL_HINT = (
    "`pip install tensorrt` on a machine with an NVIDIA GPU and driver (and a CUDA build of torch)"
)
PRECISIONS = {"fp32": "float32", "fp16": "float16"}  # plan precision -> portable graph dtype
PREFILL, DECODE = 0, 1  # optimization profile indices


class TensorRTUnavailable(ExportError, RuntimeError):
    """TensorRT or a CUDA device is missing: a TensorRT target cannot be built or run here."""


def _tensorrt():
    try:
        import tensorrt as trt
    except ImportError as e:
        raise TensorRTUnavailable(
            f"the TensorRT Python package `tensorrt` is not installed; {INSTALL_HINT}"
        ) from e
    if not torch.cuda.is_available():
        raise TensorRTUnavailable(
            f"TensorRT needs a CUDA device and torch sees none; {INSTALL_HINT}"
        )
    return trt


def optimization_profiles(
    graph: onnx.ModelProto, *, max_batch: int, max_len: int, opt_len: int, max_logits: int
) -> list[dict]:
    """min/opt/max shapes of every dynamic graph input, per profile, from its named dims.

    Prefill asks for up to `max_logits` rows of logits (a whole prompt when scoring); decode
    for one per row. The cache's batch axis follows input_ids'; its max_len axis is fixed.
    """
    ranges = {
        "prefill": {
            "batch": (1, 1, max_batch),
            "seq": (1, opt_len, max_len),
            "n_logits": (1, 1, max_logits),
        },
        "decode": {
            "batch": (1, max_batch, max_batch),
            "seq": (1, 1, 1),
            "n_logits": (1, max_batch, max_batch),
        },
    }
    profiles = []
    for name, dims in ranges.items():
        shapes = {}
        for value in graph.graph.input:
            shape = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
            if all(isinstance(d, int) for d in shape):
                continue  # static: TensorRT needs no profile for it
            unknown = [d for d in shape if isinstance(d, str) and d not in dims]
            if unknown:
                raise ExportError(f"input {value.name} has dims {unknown} no profile knows")
            shapes[value.name] = {
                key: [d if isinstance(d, int) else dims[d][i] for d in shape]
                for i, key in enumerate(("min", "opt", "max"))
            }
        profiles.append({"name": name, "shapes": shapes})
    return profiles


def build_engine(
    onnx_path: str | Path,
    engine_path: str | Path,
    *,
    max_batch: int,
    max_len: int,
    precision: str = "fp16",
    workspace_gib: float = 4.0,
    opt_len: int | None = None,
    max_logits: int | None = None,
) -> dict:
    """Builds and writes a serialized plan from a portable graph; returns what the manifest
    records: trt_version, gpu_arch ("sm90"), precision and the profiles' shapes.

    `opt_len` is the prompt length prefill kernels are tuned for (default min(128, max_len));
    `max_logits` caps the logit rows of one prefill call (default max(max_batch, max_len)).
    """
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    graph = onnx.load(str(onnx_path), load_external_data=False)
    props = {p.key: p.value for p in graph.metadata_props}
    if props.get("aimass.graph_flavour") != FLAVOUR:
        raise ExportError(f"{onnx_path} is not a portable engine graph (no TensorRT plan from it)")
    if precision not in PRECISIONS:
        raise ExportError(f"precision={precision!r} must be one of {sorted(PRECISIONS)}")
    if props.get("aimass.dtype") != PRECISIONS[precision]:
        raise ExportError(
            f"precision={precision!r} needs the portable graph exported with "
            f"dtype={PRECISIONS[precision]!r}; {onnx_path} is {props.get('aimass.dtype')!r} "
            "(TensorRT takes precision from the graph's types)"
        )
    graph_len = int(props["aimass.max_len"])
    if not 1 <= max_len <= graph_len or max_batch < 1:
        raise ExportError(
            f"max_len={max_len} must be in 1..{graph_len} (the graph's cache) "
            f"and max_batch={max_batch} >= 1"
        )
    opt_len = min(128, max_len) if opt_len is None else opt_len
    max_logits = max(max_batch, max_len) if max_logits is None else max_logits
    if not 1 <= opt_len <= max_len or max_logits < max_batch:
        raise ExportError(
            f"opt_len={opt_len} must be in 1..max_len={max_len} and "
            f"max_logits={max_logits} >= max_batch={max_batch}"
        )
    profiles = optimization_profiles(
        graph, max_batch=max_batch, max_len=max_len, opt_len=opt_len, max_logits=max_logits
    )
    del graph
    trt = _tensorrt()

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # strongly typed: required for graph-typed precision on TensorRT 10, implied on 11
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        # TF32 matmuls keep a 10-bit mantissa: an fp32 plan is meant to match eager fp32
        config.clear_flag(trt.BuilderFlag.TF32)
    for spec in profiles:  # added in order: PREFILL, then DECODE
        profile = builder.create_optimization_profile()
        for name, s in spec["shapes"].items():
            profile.set_shape(name, s["min"], s["opt"], s["max"])
        config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ExportError(f"TensorRT failed to build a plan from {onnx_path} (see its log above)")
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    engine_path.write_bytes(bytes(plan))
    major, minor = torch.cuda.get_device_capability()
    return {
        "trt_version": trt.__version__,
        "gpu_arch": f"sm{major}{minor}",
        "gpu_name": torch.cuda.get_device_name(),
        "precision": precision,
        "max_batch": max_batch,
        "max_len": max_len,
        "profiles": profiles,
    }


class TrtDecoder:
    """Runs a plan from build_engine on the current CUDA device with torch tensors.

    The decoder owns the cache: one (max_batch, K, M, hd) buffer per past tensor, allocated once.
    With `in_place` (the default) each present tensor is bound to its past buffer, so a step
    writes only its new positions; TensorRT documents aliasing only for its KV-cache layer, so
    `in_place=False` writes present into a scratch buffer and copies it back, for a TensorRT
    version where the aliased scatter is found wrong (tests/exporters/test_tensorrt.py checks
    both). Batch row r lives in cache slot r.
    """

    def __init__(self, path: str | Path, max_batch: int, max_len: int, *, in_place: bool = True):
        trt = _tensorrt()
        torch.cuda.current_device()  # initialise CUDA before TensorRT uses its context
        self._logger = trt.Logger(trt.Logger.WARNING)
        engine = trt.Runtime(self._logger).deserialize_cuda_engine(Path(path).read_bytes())
        if engine is None:
            raise ExportError(f"{path}: TensorRT {trt.__version__} cannot load this plan")
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
        # (past, present) pairs: the buffers bound to one address
        self.pairs = [(n, "present_" + n[5:]) for n in names if n.startswith("past_")]
        _, K, M, hd = engine.get_tensor_shape(self.pairs[0][0])
        batch_max = engine.get_tensor_profile_shape(self.pairs[0][0], DECODE)[2][0]
        if not 1 <= max_len <= M or not 1 <= max_batch <= batch_max:
            raise ValueError(f"max_len={max_len} must be in 1..{M}, max_batch in 1..{batch_max}")
        self.max_batch, self.max_len, self.in_place = max_batch, max_len, in_place
        self.vocab = self.engine.get_tensor_shape("logits")[1]
        self.cache = {
            p: torch.zeros((max_batch, K, M, hd), dtype=self._dtypes[p], device="cuda")
            for p, _ in self.pairs
        }
        self._scratch = (
            None if in_place else {p: torch.empty_like(t) for p, t in self.cache.items()}
        )
        self.lengths = np.zeros(max_batch, dtype=np.int64)  # tokens cached per slot
        self._profile = None

    def reset(self) -> None:
        """Forgets every slot's tokens; attention never reads past a row's length."""
        self.lengths[:] = 0

    def forward(self, input_ids, positions, seqlens_k, logits_idx) -> torch.Tensor:
        """One engine call on slots 0..B-1 (arguments as in the graph, as host arrays) ->
        logits (N, V) float32 on the device."""
        seqlens = np.asarray(seqlens_k, dtype=np.int32)
        feeds = {
            "input_ids": input_ids,
            "position_ids": positions,
            "seqlens_k": seqlens,
            "total_sequence_length": np.array(seqlens.max() + 1, dtype=np.int32),
            "logits_idx": logits_idx,
        }
        feeds = {  # host arrays -> fresh device tensors of the engine's dtypes
            n: torch.as_tensor(np.array(v), device="cuda").to(self._dtypes[n])
            for n, v in feeds.items()
            if n in self.inputs
        }
        rows, S = feeds["input_ids"].shape
        if rows > self.max_batch or seqlens.max() >= self.max_len:
            raise ValueError(
                f"{rows} rows must be <= max_batch={self.max_batch} and every row's length "
                f"<= max_len={self.max_len} (seqlens_k={seqlens.tolist()})"
            )
        stream = torch.cuda.current_stream().cuda_stream
        profile = DECODE if S == 1 else PREFILL
        if profile != self._profile:
            self.context.set_optimization_profile_async(profile, stream)
            self._profile = profile
        logits = torch.empty((len(feeds["logits_idx"]), self.vocab), device="cuda")
        binds = [*feeds.items(), ("logits", logits)]
        for past, present in self.pairs:
            view = self.cache[past][:rows]  # slots 0..rows-1: a contiguous view, nothing copied
            out = view if self.in_place else self._scratch[past][:rows]
            binds += [(past, view), (present, out)]
        for name, tensor in binds:
            if name in self._dynamic and not self.context.set_input_shape(name, tensor.shape):
                raise ValueError(f"{name} shape {tuple(tensor.shape)} is outside profile {profile}")
            self.context.set_tensor_address(name, tensor.data_ptr())
        if not self.context.execute_async_v3(stream):
            raise RuntimeError("TensorRT execute_async_v3 failed (see its log above)")
        if not self.in_place:
            for past, _ in self.pairs:
                self.cache[past][:rows].copy_(self._scratch[past][:rows])
        self.lengths[:rows] = seqlens + 1
        return logits

    def prefill(self, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """First prompts of slots 0..len(prompts)-1, right-padded -> last logits (B, V)."""
        lens = np.array([len(p) for p in prompts])
        B, S = len(prompts), int(lens.max())
        ids = np.zeros((B, S), dtype=np.int64)
        for r, p in enumerate(prompts):
            ids[r, : len(p)] = p
        positions = np.broadcast_to(np.arange(S), (B, S))
        return self.forward(ids, positions, lens - 1, np.arange(B) * S + lens - 1)

    def decode(self, tokens: Sequence[int]) -> torch.Tensor:
        """Appends one token to each of slots 0..len(tokens)-1 -> logits (B, V)."""
        pos = self.lengths[: len(tokens)].copy()
        ids = np.asarray(tokens, dtype=np.int64)[:, None]
        return self.forward(ids, pos[:, None], pos, np.arange(len(tokens)))

    def greedy_batch(
        self, prompts: list[list[int]], max_tokens: int, stop_ids: Iterable[int] = ()
    ) -> list[list[int]]:
        stops, outs = set(stop_ids), [[] for _ in prompts]
        done = [False] * len(prompts)
        logits = self.prefill(prompts)
        for step in range(max_tokens):
            tokens = logits.argmax(-1).tolist()
            for r, t in enumerate(tokens):
                done[r] = done[r] or t in stops
                if not done[r]:
                    outs[r].append(t)
            if all(done) or step == max_tokens - 1:
                break
            logits = self.decode(tokens)  # finished rows keep decoding; their tokens are dropped
        return outs

    def greedy(self, prompt_ids: list[int], max_tokens: int, stop_ids: Iterable[int] = ()):
        return self.greedy_batch([prompt_ids], max_tokens, stop_ids)[0]

    def logits(self, prompt_ids: list[int], decode_ids: Sequence[int] = ()) -> np.ndarray:
        """Every prompt position from one prefill, then one decode step per id -> (T, V)."""
        T = len(prompt_ids)
        self.reset()
        rows = [self.forward([prompt_ids], np.arange(T)[None], [T - 1], np.arange(T))]
        rows += [self.decode([t]) for t in decode_ids]
        return torch.cat(rows).cpu().numpy()

    def score(self, token_ids: Sequence[int]) -> np.ndarray:
        """log p(token_t | tokens_<t) for t = 1..n-1 (float64), in windows of max_len tokens
        overlapping by one, each scored by one prefill call."""
        ids = np.asarray(token_ids, dtype=np.int64)
        out, start = [], 0
        while start < len(ids) - 1:
            window = ids[start : start + self.max_len]
            n = len(window) - 1
            logits = self.forward(window[None, :n], np.arange(n)[None], [n - 1], np.arange(n))
            logprobs = torch.log_softmax(logits.double(), dim=-1)
            targets = torch.as_tensor(window[1:], device=logprobs.device)
            out.append(logprobs.gather(1, targets[:, None])[:, 0].cpu().numpy())
            start += n
        return np.concatenate(out) if out else np.empty(0)
