"""The builder both engine graph flavours are written with (exporters/onnx_ort.py for ONNX
Runtime, exporters/portable.py for TensorRT and any runtime): nodes, constants, the contract's
inputs and outputs, and its metadata, every name taken from engine/graph.py.

    g = GraphBuilder(TensorProto.FLOAT)
    g.declare_io(n_layers=L, n_kv_heads=K, head_dim=hd, kv_len=graph.KV_LEN, vocab_size=V)
    x = g.op("Gather", "embed.weight", graph.INPUT_IDS)          # auto-named output
    g.op("MatMul", x, "lm_head.weight", outputs=[graph.LOGITS])    # a graph output, by name
    proto = g.model("aimass-ort", [("", 21)], "aimass.exporters", metadata)

Nodes are named `scope/Op_n` (or by `name=`), so a graph read in Netron shows the layer a node
belongs to; a multi-output op returns the list of its output names.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from engine import graph
from trainer.config import ModelConfig


class GraphBuilder:
    """Accumulates nodes, initializers and the graph's inputs and outputs."""

    def __init__(self, dtype: int = TensorProto.FLOAT):
        self.dtype = dtype  # the ONNX type of weights, activations and cache
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.scope = "prologue"
        self._count = 0
        self._consts: set[str] = set()

    def op(
        self,
        op_type: str,
        *inputs: str,
        outputs: int | Sequence[str] = 1,
        name: str = "",
        domain: str = "",
        **attrs,
    ) -> str | list[str]:
        """Adds a node → its output name, or names when it has several. `outputs` is a count
        (names are made up) or the names themselves ("" skips an optional output)."""
        self._count += 1
        name = name or f"{self.scope}/{op_type}_{self._count}"
        outs = [f"{name}:{i}" for i in range(outputs)] if isinstance(outputs, int) else outputs
        node = helper.make_node(op_type, list(inputs), list(outs), name=name, **attrs)
        if domain:
            node.domain = domain
        self.nodes.append(node)
        return outs[0] if len(outs) == 1 else list(outs)

    def const(self, name: str, array: np.ndarray) -> str:
        """An initializer; a name already added is not added again (shared shapes, scalars)."""
        if name not in self._consts:
            self._consts.add(name)
            self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def ints(self, *values: int) -> str:
        """An int64 1-D constant (shapes, axes, split sizes), named by its values."""
        return self.const("i64[" + ",".join(map(str, values)) + "]", np.array(values, np.int64))

    def scalar(self, value: float, dtype: int | None = None) -> str:
        """A scalar constant, of the graph's float type unless `dtype` says otherwise."""
        np_dtype = helper.tensor_dtype_to_np_dtype(dtype or self.dtype)
        return self.const(f"{np_dtype.name}[{value!r}]", np.array(value, dtype=np_dtype))

    def to_float(self, x: str) -> str:
        """The activation in float32 (no node when the graph already is float32)."""
        if self.dtype == TensorProto.FLOAT:
            return x
        return self.op("Cast", x, to=TensorProto.FLOAT)

    def from_float(self, x: str) -> str:
        if self.dtype == TensorProto.FLOAT:
            return x
        return self.op("Cast", x, to=self.dtype)

    def declare_io(
        self, *, n_layers: int, n_kv_heads: int, head_dim: int, kv_len: str | int, vocab_size: int
    ) -> None:
        """The contract's inputs and outputs (engine/graph.py), the cache in the graph's dtype
        with `kv_len` positions per row (a symbolic name or a fixed number)."""
        cache = graph.cache_dims(n_kv_heads, kv_len, head_dim)
        pairs = graph.cache_names(n_layers)
        self.inputs += [self._value(s.name, s.dtype, s.dims) for s in graph.STEP_INPUTS]
        self.inputs += [self._value(past, graph.CACHE, cache) for past, _ in pairs]
        logits = graph.logits_spec(vocab_size)
        self.outputs.append(self._value(logits.name, logits.dtype, logits.dims))
        self.outputs += [self._value(present, graph.CACHE, cache) for _, present in pairs]

    def _value(self, name: str, dtype: str, dims: Sequence[str | int]) -> onnx.ValueInfoProto:
        elem = (
            self.dtype if dtype == graph.CACHE else helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
        )
        return helper.make_tensor_value_info(name, elem, list(dims))

    def model(
        self,
        name: str,
        opsets: Sequence[tuple[str, int]],
        producer: str,
        metadata: graph.GraphMetadata,
        *,
        ir_version: int | None = None,
    ) -> onnx.ModelProto:
        g = helper.make_graph(self.nodes, name, self.inputs, self.outputs, self.initializers)
        proto = helper.make_model(
            g,
            opset_imports=[helper.make_opsetid(domain, v) for domain, v in opsets],
            producer_name=producer,
        )
        if ir_version is not None:
            proto.ir_version = ir_version
        helper.set_model_props(proto, metadata.props())
        return proto


def graph_metadata(cfg: ModelConfig, flavour: str, max_len: int, dtype: str) -> graph.GraphMetadata:
    """What a graph of `cfg` built now states: the current contract version."""
    return graph.GraphMetadata(
        version=graph.GRAPH_VERSION,
        flavour=flavour,
        max_len=max_len,
        dtype=dtype,
        model_config=json.dumps(dataclasses.asdict(cfg), sort_keys=True),
    )


def read_metadata(proto_or_path: onnx.ModelProto | str | Path) -> graph.GraphMetadata:
    """The metadata of a graph (a proto, or a file read without its weights)."""
    proto, source = proto_or_path, "the graph"
    if not isinstance(proto, onnx.ModelProto):
        proto, source = onnx.load(str(proto_or_path), load_external_data=False), str(proto_or_path)
    props = {p.key: p.value for p in proto.metadata_props}
    return graph.GraphMetadata.from_props(props, source)


def read_config(proto_or_path: onnx.ModelProto | str | Path) -> tuple[ModelConfig, int]:
    """The ModelConfig and max_len stored in a graph of either flavour."""
    meta = read_metadata(proto_or_path)
    return ModelConfig(**json.loads(meta.model_config)), meta.max_len
