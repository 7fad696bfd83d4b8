"""The export targets: what each one is (flavour, runtime, dtype, quantization, exactness) and
how its artifact is built and run. A target's properties come from TARGETS, never from parsing
its name; builders are keyed by flavour and decoders by runtime.

    flavour   built by                                      run (parity) by
    ort       onnx_ort.build_ort_graph (+ quantize) → save  runner.OrtDecoder
    portable  portable.build_portable_graph → save          runner.OrtDecoder
    tensorrt  portable graph → tensorrt.build_engine        tensorrt.TrtDecoder
"""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine.graph import ORT, PORTABLE, graph_version
from exporters import gguf_blocks, onnx_ort
from exporters.errors import ExportError
from exporters.parity import Decoder
from exporters.portable import build_portable_graph
from exporters.runner import OrtDecoder
from exporters.tensorrt import TrtDecoder, build_engine
from registry.manifest import Artifact, Quantization, file_entry

QUANT_BLOCK_SIZE = 32  # weights per scale: finer blocks keep int4 within the perplexity limit
QUANT_ACCURACY_LEVEL = 4  # MatMulNBits computes with int8 activations: fastest on CPUs
# A GGUF file's blocks: 4-bit projections in fp32 (level 4's int8 activations alone cost
# SmolLM2 3.7 points of top-1 agreement, past the gate), the 8-bit head at level 4 (its only
# fast CPU path) with its top logits recomputed exactly; docs/exporters.md has the figures
GGUF_ACCURACY_LEVEL = 0
GGUF_HEAD_ACCURACY_LEVEL = 4
TRT_MAX_BATCH = 16  # rows a TensorRT plan's profiles accept: its shapes are fixed at build time
TRT_PRECISIONS = {"float16": "fp16", "float32": "fp32"}  # target dtype → plan precision


@dataclass(frozen=True)
class TargetSpec:
    flavour: str  # "ort" (contrib ops) | "portable" (standard ops) | "tensorrt" (a plan)
    runtime: str  # what runs it: "onnxruntime" | "tensorrt"
    dtype: str  # activations and unquantized weights
    bits: int | None  # weight-only quantization, None = full precision
    exact: bool  # greedy decoding must match eager PyTorch token for token
    kv_dtype: str = "float32"  # the KV cache's type (engine.graph.KV_DTYPES; ORT flavour only)


# the -kv16 variants hold their KV cache in float16 (half the memory per cached token; q, k and
# v cast to float16 around each GroupQueryAttention); docs/engine.md "16-bit cache" has figures
TARGETS: dict[str, TargetSpec] = {
    "onnx-fp32": TargetSpec(ORT, "onnxruntime", "float32", None, True),
    "onnx-int4": TargetSpec(ORT, "onnxruntime", "float32", 4, False),
    "onnx-int8": TargetSpec(ORT, "onnxruntime", "float32", 8, False),
    "onnx-fp32-kv16": TargetSpec(ORT, "onnxruntime", "float32", None, False, "float16"),
    "onnx-int4-kv16": TargetSpec(ORT, "onnxruntime", "float32", 4, False, "float16"),
    "onnx-int8-kv16": TargetSpec(ORT, "onnxruntime", "float32", 8, False, "float16"),
    "onnx-portable-fp32": TargetSpec(PORTABLE, "onnxruntime", "float32", None, True),
    "trt-fp16": TargetSpec("tensorrt", "tensorrt", "float16", None, False),
}


def parse_targets(targets: Sequence[str]) -> dict[str, TargetSpec]:
    """Checks the requested targets (before any work); raises ExportError listing the known ones."""
    names = list(dict.fromkeys(t.strip() for t in targets if t.strip()))
    known = ", ".join(TARGETS)
    if not names:
        raise ExportError(f"no target given; known targets: {known}")
    unknown = [t for t in names if t not in TARGETS]
    if unknown:
        raise ExportError(f"unknown target {', '.join(map(repr, unknown))}; known targets: {known}")
    return {t: TARGETS[t] for t in names}


def check_runtimes(specs: dict[str, TargetSpec]) -> None:
    # a missing runtime is an error before any work, never a silently skipped target
    for target, spec in specs.items():
        if spec.runtime != "tensorrt":
            continue
        if importlib.util.find_spec("tensorrt") is None:
            raise ExportError(
                f"{target} needs the TensorRT Python package `tensorrt` (pip install tensorrt) "
                "and an NVIDIA GPU; it is not installed"
            )
        if not torch.cuda.is_available():
            raise ExportError(f"{target} needs an NVIDIA GPU (CUDA); torch sees none here")


# --- building artifacts -----------------------------------------------------------------------


@dataclass
class Build:
    model: Any  # trainer.model.Transformer
    max_len: int
    root: Path  # the staging folder
    graphs: dict[tuple[str, str, str], Any] = field(default_factory=dict)  # onnx.ModelProto
    checkpoint: Path | None = None  # where the model came from: its quantized blocks, if any
    _blocks: dict[str, Any] | None = field(default=None, repr=False)

    def blocks(self) -> dict[str, Any]:
        """The checkpoint's quantized blocks (trainer.checkpoint.BlockWeight by weight name),
        read and checked against the model's weights on first use."""
        if self._blocks is None:
            self._blocks = (
                gguf_blocks.load_checked(self.checkpoint, self.model) if self.checkpoint else {}
            )
        return self._blocks

    def graph(self, flavour: str, dtype: str = "float32", kv_dtype: str = "float32"):
        """The graph of a flavour, dtype and cache type (an ORT graph's own; a portable graph's
        cache is its dtype), built once and shared by its quantized variants."""
        key = (flavour, dtype, kv_dtype)
        if key not in self.graphs:
            if flavour == ORT:
                if dtype != "float32":
                    raise ExportError(f"the ONNX Runtime flavour is float32 only, not {dtype}")
                self.graphs[key] = onnx_ort.build_ort_graph(self.model, self.max_len, kv_dtype)
            else:
                self.graphs[key] = build_portable_graph(self.model, self.max_len, dtype=dtype)
        return self.graphs[key]


def build_artifact(build: Build, target: str, spec: TargetSpec) -> Artifact:
    folder = build.root / target
    folder.mkdir()
    fields = BUILDERS[spec.flavour](build, spec, folder)
    files = [file_entry(build.root, p) for p in sorted(folder.rglob("*")) if p.is_file()]
    return Artifact(
        target=target,
        flavour=spec.flavour,
        runtime=spec.runtime,
        dtype=spec.dtype,
        files=files,
        max_len=build.max_len,
        **fields,
    )


def _build_onnx(build: Build, spec: TargetSpec, folder: Path) -> dict:
    # quantize and save leave their input intact, so the cached fp32 graph serves every target
    proto = build.graph(spec.flavour, kv_dtype=spec.kv_dtype)
    quantization = None
    if spec.bits is not None and _from_blocks(build, spec):
        # weights that arrived quantized are served as they arrived, not quantized again
        proto, quantization = gguf_blocks.apply_blocks(
            proto,
            build.blocks(),
            build.model.cfg,
            spec.bits,
            GGUF_ACCURACY_LEVEL,
            GGUF_HEAD_ACCURACY_LEVEL,
        )
    elif spec.bits is not None:
        proto = onnx_ort.quantize(
            proto, bits=spec.bits, block_size=QUANT_BLOCK_SIZE, accuracy_level=QUANT_ACCURACY_LEVEL
        )
        quantization = _quantization_of(proto, spec.bits)
    onnx_ort.save(proto, folder / "model.onnx")
    return {
        "entry": f"{folder.name}/model.onnx",
        "quantization": quantization,
        "graph_version": _graph_version(proto),
    }


def _from_blocks(build: Build, spec: TargetSpec) -> bool:
    """An ORT target of the bit width of the checkpoint's own blocks (a GGUF import's Q4_0,
    Q4_1, Q8_0) is built from them; any other quantized target is round-to-nearest."""
    if spec.flavour != ORT or build.checkpoint is None:
        return False
    return gguf_blocks.scheme(build.blocks(), build.model.cfg, spec.bits) is not None


def _build_trt(build: Build, spec: TargetSpec, folder: Path) -> dict:
    scratch = build.root / f".{folder.name}.onnx"  # the portable graph TensorRT parses
    scratch.mkdir()
    proto = build.graph(PORTABLE, spec.dtype)  # TensorRT takes precision from the graph
    onnx_ort.save(proto, scratch / "model.onnx")
    info = build_engine(
        scratch / "model.onnx",
        folder / "model.plan",
        max_batch=TRT_MAX_BATCH,
        max_len=build.max_len,
        precision=TRT_PRECISIONS[spec.dtype],
    )
    shutil.rmtree(scratch)
    return {
        "entry": f"{folder.name}/model.plan",
        "graph_version": _graph_version(proto),
        "trt_version": info["trt_version"],
        "gpu_arch": info["gpu_arch"],
        "precision": info["precision"],
        "profiles": info["profiles"],
        "max_batch": info.get("max_batch", TRT_MAX_BATCH),
    }


BUILDERS: dict[str, Callable[[Build, TargetSpec, Path], dict]] = {
    ORT: _build_onnx,
    PORTABLE: _build_onnx,
    "tensorrt": _build_trt,
}


def ort_decoder(path: Path, max_len: int, threads: int | None) -> Decoder:
    return OrtDecoder(path, max_batch=1, max_len=max_len, threads=threads)


def _trt_decoder(path: Path, max_len: int, threads: int | None) -> Decoder:
    return TrtDecoder(path, max_batch=1, max_len=max_len)


DECODERS: dict[str, Callable[[Path, int, int | None], Decoder]] = {
    "onnxruntime": ort_decoder,
    "tensorrt": _trt_decoder,
}


def _quantization_of(proto, bits: int) -> Quantization:
    """What the quantizer did, read from the graph (MatMulNBits attributes), not assumed."""
    nodes = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
    if not nodes:
        raise ExportError(f"the int{bits} graph holds no MatMulNBits node: nothing was quantized")
    attrs = {a.name: a.i for a in nodes[0].attribute}
    return Quantization(
        method="MatMulNBits",
        bits=attrs.get("bits", bits),
        block_size=attrs.get("block_size", QUANT_BLOCK_SIZE),
        symmetric=all(len(n.input) < 4 or not n.input[3] for n in nodes),
        accuracy_level=attrs.get("accuracy_level", 0),
    )


def _graph_version(proto) -> int:
    """The version the graph states (the builders write it), for the manifest's record."""
    return graph_version({p.key: p.value for p in proto.metadata_props})
