"""The engine graph contract (engine/graph.py): what the exporters write is what it says, and the
engine refuses a graph of a contract version it does not run while still loading the packages
exported before the version was recorded."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import msgspec
import numpy as np
import onnx
import pytest
import torch

from engine import graph
from engine.loader import EngineConfig, LoadError, open_core
from engine.runner import OrtRunner
from exporters.onnx_ort import build_ort_graph
from exporters.portable import build_portable_graph
from registry.manifest import MANIFEST, encode, file_entry, load
from tests.engine.plans import with_plan_artifact
from trainer.config import PRESETS
from trainer.model import Transformer

TARGET = "onnx-fp32"


def signature(values) -> list[tuple[str, list]]:
    return [
        (v.name, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]) for v in values
    ]


def props_of(proto: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in proto.metadata_props}


def test_exported_graphs_state_the_contract(tiny_package):
    manifest = load(tiny_package)
    for artifact in manifest.artifacts:  # fp32 and int8: the quantizer keeps the metadata
        proto = onnx.load(str(tiny_package / artifact.entry), load_external_data=False)
        cfg = manifest.model
        pairs = graph.cache_names(cfg.n_layers)
        cache = [graph.BATCH, cfg.n_kv_heads, graph.KV_LEN, cfg.head_dim]
        assert signature(proto.graph.input) == [
            (graph.INPUT_IDS, [graph.BATCH, graph.SEQ]),
            (graph.POSITION_IDS, [graph.BATCH, graph.SEQ]),
            (graph.SEQLENS_K, [graph.BATCH]),
            (graph.TOTAL_SEQUENCE_LENGTH, []),
            (graph.LOGITS_IDX, [graph.N_LOGITS]),
        ] + [(past, cache) for past, _ in pairs]
        assert signature(proto.graph.output) == [
            (graph.LOGITS, [graph.N_LOGITS, cfg.vocab_size])
        ] + [(present, cache) for _, present in pairs]
        props = props_of(proto)
        assert props[graph.VERSION_KEY] == str(graph.GRAPH_VERSION)
        assert props[graph.FLAVOUR_KEY] == graph.ORT == artifact.flavour
        assert props[graph.MAX_LEN_KEY] == str(artifact.max_len)
        assert props[graph.DTYPE_KEY] == "float32"
        assert json.loads(props[graph.CONFIG_KEY])["n_kv_heads"] == cfg.n_kv_heads
        assert artifact.graph_version == graph.GRAPH_VERSION


def test_both_flavours_take_and_return_the_same_tensors():
    torch.manual_seed(0)
    model = Transformer(PRESETS["tiny"]).eval()
    ort_graph, portable = build_ort_graph(model, 32), build_portable_graph(model, 32)
    for kind in ("input", "output"):
        names = [[v.name for v in getattr(p.graph, kind)] for p in (ort_graph, portable)]
        assert names[0] == names[1]
    dtypes = {v.name: v.type.tensor_type.elem_type for v in portable.graph.input}
    assert dtypes == {v.name: v.type.tensor_type.elem_type for v in ort_graph.graph.input}
    for spec in graph.STEP_INPUTS:
        assert dtypes[spec.name] == onnx.helper.np_dtype_to_tensor_dtype(np.dtype(spec.dtype))
    assert props_of(portable)[graph.FLAVOUR_KEY] == graph.PORTABLE
    assert props_of(portable)[graph.VERSION_KEY] == str(graph.GRAPH_VERSION)
    # the portable cache is fixed at max_len (TensorRT fixes shapes); the ORT one is symbolic
    assert signature(portable.graph.input)[-1][1][2] == 32


def copy_package(tiny_package: Path, dest: Path) -> Path:
    return Path(shutil.copytree(tiny_package, dest / "pkg"))


def edit_graph_metadata(pkg: Path, edit) -> None:
    """Rewrites the target's graph metadata (its weights stay in model.onnx.data) and the
    manifest's record of the file, so that the package is not merely damaged."""
    manifest = load(pkg)
    artifact = manifest.artifact(TARGET)
    path = pkg / artifact.entry
    proto = onnx.load(str(path), load_external_data=False)
    onnx.helper.set_model_props(proto, edit(props_of(proto)))
    onnx.save(proto, str(path))
    files = [
        file_entry(pkg, pkg / f.path) if f.path == artifact.entry else f for f in artifact.files
    ]
    artifacts = [
        msgspec.structs.replace(a, files=files) if a is artifact else a for a in manifest.artifacts
    ]
    (pkg / MANIFEST).write_bytes(encode(msgspec.structs.replace(manifest, artifacts=artifacts)))


def test_a_graph_of_an_unknown_version_is_refused_at_load(tiny_package, tmp_path):
    pkg = copy_package(tiny_package, tmp_path)
    newer = graph.GRAPH_VERSION + 1
    edit_graph_metadata(pkg, lambda props: props | {graph.VERSION_KEY: str(newer)})
    with pytest.raises(LoadError) as e:
        open_core(pkg, EngineConfig(target=TARGET, n_slots=2, threads=1))
    assert str(e.value) == (
        f"graph contract version {newer} of {pkg} target {TARGET} is not supported by this "
        f"engine (it runs version {graph.GRAPH_VERSION}); re-export the package"
    )


@pytest.mark.parametrize("target", [TARGET, "trt-fp16"])
def test_the_manifest_record_of_the_version_is_checked_too(tiny_package, tmp_path, target):
    """A TensorRT plan carries no ONNX metadata: the manifest's graph_version is all there is,
    checked before TensorRT is needed."""
    pkg = with_plan_artifact(tiny_package, tmp_path)
    manifest = load(pkg)
    newer = graph.GRAPH_VERSION + 1
    artifacts = [
        msgspec.structs.replace(a, graph_version=newer) if a.target == target else a
        for a in manifest.artifacts
    ]
    (pkg / MANIFEST).write_bytes(encode(msgspec.structs.replace(manifest, artifacts=artifacts)))
    with pytest.raises(LoadError) as e:
        open_core(pkg, EngineConfig(target=target, n_slots=2, threads=1))
    assert str(e.value) == (
        f"graph contract version {newer} of {pkg} target {target} is not supported by this "
        f"engine (it runs version {graph.GRAPH_VERSION}); re-export the package"
    )


def test_a_graph_with_no_version_loads_as_version_1(tiny_package, tmp_path):
    """A package exported before the version was recorded: no key in the graph's metadata and
    none in the manifest."""
    pkg = copy_package(tiny_package, tmp_path)
    edit_graph_metadata(
        pkg, lambda props: {k: v for k, v in props.items() if k != graph.VERSION_KEY}
    )
    raw = json.loads((pkg / MANIFEST).read_bytes())
    for artifact in raw["artifacts"]:
        del artifact["graph_version"]
    (pkg / MANIFEST).write_text(json.dumps(raw))
    assert graph.VERSION_KEY not in props_of(
        onnx.load(str(pkg / TARGET / "model.onnx"), load_external_data=False)
    )

    _, info = open_core(pkg, EngineConfig(target=TARGET, n_slots=2, threads=1))
    assert info.target == TARGET
    runner = OrtRunner(pkg / TARGET / "model.onnx", 1, 16, threads=1)
    logits = runner.forward(np.array([[1, 2, 3]]), np.arange(3)[None], np.array([2]), np.array([2]))
    assert logits.shape == (1, info.vocab_size) and np.isfinite(logits).all()


def test_a_version_that_is_not_a_number_names_the_key_and_value():
    with pytest.raises(ValueError, match=r"aimass.graph_version = 'two' must be a whole number"):
        graph.graph_version({graph.VERSION_KEY: "two"})
    assert graph.graph_version({}) == 1


def test_the_contract_module_is_a_leaf():
    """The engine and the exporters both import it: it must not pull in a runtime or torch."""
    code = "import sys, engine.graph; print(sorted({'onnx', 'onnxruntime', 'torch', 'numpy'} & set(sys.modules)))"
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
