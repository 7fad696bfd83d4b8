"""TensorRT plans from the portable graph, and a decoder that runs them on CUDA.

The plan is built with two optimization profiles (serving.md §3.5), because TensorRT tunes its
kernels for one shape per profile and a KV decoder runs two very different ones (added in this
order: engine/trt_runner.py picks them by index):

    profile 0  prefill  input_ids B x 1 .. B x max_len, opt at a typical prompt, one row
    profile 1  decode   input_ids B x 1, opt at a full batch

Precision comes from the graph, not from builder flags: TensorRT 11 removed the weakly typed
flags (BuilderFlag.FP16 and friends), so the network is created strongly typed and an fp16 plan
is built from the portable graph exported with dtype="float16" (its norms, rotary and softmax
stay float32 there). A plan runs only on the TensorRT version and GPU architecture that built
it; build_engine returns both for the manifest.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import torch

from engine import graph as contract
from engine.runner import ProviderUnavailable
from engine.trt_runner import INSTALL_HINT, TrtRunner
from exporters.errors import ExportError
from exporters.runner import DecodeLoops

PRECISIONS = {"fp32": "float32", "fp16": "float16"}  # plan precision -> portable graph dtype


class TensorRTUnavailable(ExportError, RuntimeError):
    """TensorRT or a CUDA device is missing: a TensorRT target cannot be built or run here."""


def _tensorrt():
    try:
        import tensorrt as trt  # tensorrt: optional, present only where plans are built
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
            contract.BATCH: (1, 1, max_batch),
            contract.SEQ: (1, opt_len, max_len),
            contract.N_LOGITS: (1, 1, max_logits),
        },
        "decode": {
            contract.BATCH: (1, max_batch, max_batch),
            contract.SEQ: (1, 1, 1),
            contract.N_LOGITS: (1, max_batch, max_batch),
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
    try:
        meta = contract.GraphMetadata.from_props(props, str(onnx_path))
        contract.check_version(meta.version, str(onnx_path))
    except ValueError as e:
        raise ExportError(str(e)) from None
    if meta.flavour != contract.PORTABLE:
        raise ExportError(f"{onnx_path} is not a portable engine graph (no TensorRT plan from it)")
    if precision not in PRECISIONS:
        raise ExportError(f"precision={precision!r} must be one of {sorted(PRECISIONS)}")
    if meta.dtype != PRECISIONS[precision]:
        raise ExportError(
            f"precision={precision!r} needs the portable graph exported with "
            f"dtype={PRECISIONS[precision]!r}; {onnx_path} is {meta.dtype!r} "
            "(TensorRT takes precision from the graph's types)"
        )
    graph_len = meta.max_len
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


class TrtDecoder(DecodeLoops, TrtRunner):
    """A plan from build_engine on the current CUDA device: the engine's TrtRunner (the cache
    allocated once, present bound to past unless `in_place=False`; see engine/trt_runner.py)
    plus the parity loops, batch row r in slot r."""

    def __init__(self, path: str | Path, max_batch: int, max_len: int, *, in_place: bool = True):
        _tensorrt()  # TensorRTUnavailable, an export error, says what to install
        try:
            TrtRunner.__init__(self, path, max_batch, max_len, in_place=in_place)
        except ProviderUnavailable as e:
            raise TensorRTUnavailable(str(e)) from None
        except ValueError as e:  # the runner's n_slots is this decoder's max_batch
            raise ExportError(f"{path}: {str(e).replace('n_slots', 'max_batch')}") from None
        self.max_batch = max_batch
