"""The engine graph contract (architecture contract 2): the one home of every name, dimension,
metadata key and flavour the exporters write and the runners read, and its version.

Both flavours (exporters/onnx_ort.py, exporters/portable.py) take and return the same tensors;
the ORT runner (engine/runner.py), the TensorRT runner (engine/trt_runner.py) and the parity
harness (exporters/runner.py) bind them by these names. B batch rows (cache slots), S new tokens
per row, N logit rows asked for, L layers, K kv heads, hd head dim, M cache positions per row,
V vocabulary; `cache` is the graph's dtype (float32, or float16 in an fp16 portable graph), or
float16 in a float32 ORT graph built with a 16-bit cache (aimass.kv_dtype below):

    inputs                                                    outputs
    input_ids              int64  (batch, seq)      (B, S)    logits  float32 (n_logits, V)
    position_ids           int64  (batch, seq)      (B, S)            rows in logits_idx order
    seqlens_k              int32  (batch,)          (B,)
    total_sequence_length  int32  ()                          present_key_i    cache (B,K,M,hd)
    logits_idx             int64  (n_logits,)       (N,)      present_value_i  cache (B,K,M,hd)
    past_key_i             cache  (batch,K,M,hd)    i in 0..L-1    the SAME buffers as past_*:
    past_value_i           cache  (batch,K,M,hd)                   a runtime binds each present
                                                                   to its past's memory
    input_ids      right-padded new tokens of each row
    position_ids   absolute position of each token (consecutive within a row)
    seqlens_k      each row's total length - 1 after this step (past + real new tokens)
    total_sequence_length   max over rows of seqlens_k + 1
    logits_idx     indices into the flat B*S token axis: the only rows the lm_head computes
    M              `kv_len`, symbolic, in the ORT flavour (a runner sizes its cache up to
                   max_len); fixed at max_len in the portable one (TensorRT plans fix shapes)

metadata_props of the .onnx file (TensorRT plans carry none: the manifest records their version):

    aimass.graph_version   GRAPH_VERSION as decimal text: what the names and semantics above are
    aimass.graph_flavour   "ort" (ONNX Runtime contrib ops) | "portable" (standard ops)
    aimass.model_config    the trainer's ModelConfig as JSON (what the exporter's parity rebuilds)
    aimass.max_len         positions < max_len are valid (the rotary tables' length)
    aimass.dtype           "float32" | "float16": weights, activations and cache
    aimass.kv_dtype        the cache's type where it differs from aimass.dtype ("float16" in an
                           ORT graph built with a 16-bit cache); absent = aimass.dtype

GRAPH_VERSION changes when a runner built for the old contract would misread a new graph (a
renamed or added input, a new meaning of seqlens_k); the engine refuses a version it does not
run instead of failing somewhere inside a forward. Nothing here imports onnx or a runtime: the
engine and the exporters both import this module.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

GRAPH_VERSION = 1  # the contract this code writes and the only one its runners run

# inputs
INPUT_IDS = "input_ids"
POSITION_IDS = "position_ids"
SEQLENS_K = "seqlens_k"
TOTAL_SEQUENCE_LENGTH = "total_sequence_length"
LOGITS_IDX = "logits_idx"
# outputs
LOGITS = "logits"
# the cache: past_{kind}_{layer} in, present_{kind}_{layer} out
PAST, PRESENT = "past", "present"
KEY, VALUE = "key", "value"
CACHE_KINDS = (KEY, VALUE)

# symbolic dimension names (TensorRT's optimization profiles are keyed by them)
BATCH = "batch"
SEQ = "seq"
N_LOGITS = "n_logits"
KV_LEN = "kv_len"  # the ORT flavour's cache length; the portable flavour's is the number max_len

# metadata_props keys
VERSION_KEY = "aimass.graph_version"
FLAVOUR_KEY = "aimass.graph_flavour"
CONFIG_KEY = "aimass.model_config"
MAX_LEN_KEY = "aimass.max_len"
DTYPE_KEY = "aimass.dtype"
KV_DTYPE_KEY = "aimass.kv_dtype"

# the cache types an ORT graph may be built with (its activations stay float32)
KV_DTYPES = ("float32", "float16")

# graph flavours (a manifest artifact's `flavour`; "tensorrt" there is a plan built from PORTABLE)
ORT = "ort"
PORTABLE = "portable"

CACHE = "cache"  # a TensorSpec dtype meaning "the graph's dtype" (float32 or float16)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # a numpy dtype name, or CACHE
    dims: tuple[str | int, ...]  # the symbolic names above, or fixed sizes (K, hd, V)


# the step's small inputs, in graph order (the cache inputs follow, layer by layer)
STEP_INPUTS = (
    TensorSpec(INPUT_IDS, "int64", (BATCH, SEQ)),
    TensorSpec(POSITION_IDS, "int64", (BATCH, SEQ)),
    TensorSpec(SEQLENS_K, "int32", (BATCH,)),
    TensorSpec(TOTAL_SEQUENCE_LENGTH, "int32", ()),
    TensorSpec(LOGITS_IDX, "int64", (N_LOGITS,)),
)


def logits_spec(vocab_size: int) -> TensorSpec:
    return TensorSpec(LOGITS, "float32", (N_LOGITS, vocab_size))


def cache_dims(n_kv_heads: int, kv_len: str | int, head_dim: int) -> tuple[str | int, ...]:
    return (BATCH, n_kv_heads, kv_len, head_dim)


def past_name(kind: str, layer: int) -> str:
    return f"{PAST}_{kind}_{layer}"


def present_name(kind: str, layer: int) -> str:
    return f"{PRESENT}_{kind}_{layer}"


def cache_names(n_layers: int) -> list[tuple[str, str]]:
    """(past, present) name pairs in graph order: the buffers a runtime binds to one address."""
    return [
        (past_name(kind, i), present_name(kind, i)) for i in range(n_layers) for kind in CACHE_KINDS
    ]


def count_layers(input_names: Iterable[str]) -> int:
    """L, from a graph's input names: its past_key_i inputs."""
    prefix = f"{PAST}_{KEY}_"
    return sum(name.startswith(prefix) for name in input_names)


@dataclass(frozen=True)
class GraphMetadata:
    """What a graph's metadata_props state, as written by exporters/graph_builder.py."""

    version: int
    flavour: str
    max_len: int
    dtype: str
    model_config: str  # JSON; only the exporters (which have the trainer) parse it
    kv_dtype: str | None = None  # the cache's type; None = dtype

    @classmethod
    def from_props(cls, props: Mapping[str, str], source: str) -> GraphMetadata:
        missing = [k for k in (FLAVOUR_KEY, CONFIG_KEY, MAX_LEN_KEY, DTYPE_KEY) if k not in props]
        if missing:
            raise ValueError(f"{source} is not an engine graph: no {', '.join(missing)} metadata")
        return cls(
            version=graph_version(props),
            flavour=props[FLAVOUR_KEY],
            max_len=int(props[MAX_LEN_KEY]),
            dtype=props[DTYPE_KEY],
            model_config=props[CONFIG_KEY],
            kv_dtype=props.get(KV_DTYPE_KEY),
        )

    def props(self) -> dict[str, str]:
        return {
            VERSION_KEY: str(self.version),
            FLAVOUR_KEY: self.flavour,
            CONFIG_KEY: self.model_config,
            MAX_LEN_KEY: str(self.max_len),
            DTYPE_KEY: self.dtype,
        } | ({KV_DTYPE_KEY: self.kv_dtype} if self.kv_dtype not in (None, self.dtype) else {})


class UnsupportedGraph(ValueError):
    """A graph written for a contract version this engine does not run."""

    def __init__(self, version: int, source: str):
        self.version, self.source = version, source
        super().__init__(
            f"graph contract version {version} of {source} is not supported by this engine "
            f"(it runs version {GRAPH_VERSION}); re-export the package"
        )


def graph_version(props: Mapping[str, str]) -> int:
    """The contract version a graph's metadata_props state. Graphs exported before the version
    was recorded carry none; they are version 1 (the names and semantics above are theirs), so
    packages exported then keep loading."""
    value = props.get(VERSION_KEY, "1")
    if not value.isdigit():
        raise ValueError(f"the graph's {VERSION_KEY} = {value!r} must be a whole number")
    return int(value)


def check_version(version: int, source: str) -> None:
    """Raises UnsupportedGraph, naming `source` and both versions, unless this engine runs it."""
    if version != GRAPH_VERSION:
        raise UnsupportedGraph(version, source)
