"""TensorRT plans from the portable graph.

Without TensorRT the builder must say what to install (a normal test). With `tensorrt` and an
NVIDIA GPU (`pytest -m gpu -s tests/exporters/test_tensorrt.py`) a plan of the tiny model, fp32
and fp16, must decode like eager PyTorch; the test prints the max logit difference and the first
greedy divergence per prompt.
"""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import onnx
import pytest
import torch

from engine import graph
from exporters.errors import ExportError
from exporters.onnx_ort import build_ort_graph
from exporters.portable import build_portable_graph
from exporters.tensorrt import (
    TensorRTUnavailable,
    TrtDecoder,
    build_engine,
    optimization_profiles,
)
from trainer.config import PRESETS
from trainer.generate import generate
from trainer.model import Transformer

MAX_LEN, MAX_BATCH = 64, 4
HAVE_TRT = importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()
# eager fp32 vs the plan: fp32 differs only in summation order; fp16 in every matmul
TOLERANCE = {"fp32": 1e-3, "fp16": 3e-2}
PROMPTS = [[5, 17, 42, 7], [1, 2, 3], [100, 200, 300, 400, 500], [3, 1, 4, 1, 5, 9, 2, 6]]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(PRESETS["tiny"]).eval()


def saved_graph(model, path, dtype: str):
    onnx.save(build_portable_graph(model, MAX_LEN, dtype=dtype), path)
    return path


def test_without_tensorrt_the_error_says_what_to_install(model, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError
    graph = saved_graph(model, tmp_path / "model.onnx", "float16")
    with pytest.raises(TensorRTUnavailable, match=r"`pip install tensorrt` on a machine with an"):
        build_engine(graph, tmp_path / "model.plan", max_batch=2, max_len=MAX_LEN)
    with pytest.raises(TensorRTUnavailable, match=r"pip install tensorrt"):
        TrtDecoder(tmp_path / "model.plan", max_batch=1, max_len=MAX_LEN)
    assert not (tmp_path / "model.plan").exists()
    assert issubclass(TensorRTUnavailable, RuntimeError)
    assert issubclass(TensorRTUnavailable, ExportError)  # the CLI reports it like any export error


def test_arguments_are_checked_before_tensorrt_is_needed(model, tmp_path):
    fp32 = saved_graph(model, tmp_path / "fp32.onnx", "float32")
    with pytest.raises(ExportError, match=r"precision='fp16' needs .* dtype='float16'"):
        build_engine(fp32, tmp_path / "a.plan", max_batch=2, max_len=MAX_LEN, precision="fp16")
    with pytest.raises(ExportError, match=r"precision='int8' must be one of \['fp16', 'fp32'\]"):
        build_engine(fp32, tmp_path / "a.plan", max_batch=2, max_len=MAX_LEN, precision="int8")
    with pytest.raises(ExportError, match=r"max_len=65 must be in 1..64"):
        build_engine(fp32, tmp_path / "a.plan", max_batch=2, max_len=65, precision="fp32")
    with pytest.raises(ExportError, match=r"opt_len=100 must be in 1..max_len=64"):
        build_engine(
            fp32, tmp_path / "a.plan", max_batch=2, max_len=64, precision="fp32", opt_len=100
        )
    newer = onnx.load(str(fp32))
    onnx.helper.set_model_props(
        newer, {p.key: p.value for p in newer.metadata_props} | {graph.VERSION_KEY: "99"}
    )
    onnx.save(newer, tmp_path / "newer.onnx")
    with pytest.raises(ExportError, match=r"graph contract version 99 of .*newer.onnx is not"):
        build_engine(tmp_path / "newer.onnx", tmp_path / "a.plan", max_batch=2, max_len=MAX_LEN)
    ort_graph = tmp_path / "ort.onnx"
    onnx.save(build_ort_graph(model, MAX_LEN), ort_graph)
    with pytest.raises(ExportError, match=r"ort.onnx is not a portable engine graph"):
        build_engine(ort_graph, tmp_path / "a.plan", max_batch=2, max_len=MAX_LEN)
    assert not (tmp_path / "a.plan").exists()


def test_two_profiles_prefill_and_decode(model):
    cfg = model.cfg
    prefill, decode = optimization_profiles(
        build_portable_graph(model, MAX_LEN),
        max_batch=4,
        max_len=MAX_LEN,
        opt_len=16,
        max_logits=64,
    )
    assert (prefill["name"], decode["name"]) == ("prefill", "decode")
    assert prefill["shapes"]["input_ids"] == {"min": [1, 1], "opt": [1, 16], "max": [4, 64]}
    assert decode["shapes"]["input_ids"] == {"min": [1, 1], "opt": [4, 1], "max": [4, 1]}
    assert decode["shapes"]["seqlens_k"] == {"min": [1], "opt": [4], "max": [4]}
    assert prefill["shapes"]["logits_idx"]["max"] == [64]
    assert decode["shapes"]["logits_idx"]["max"] == [4]
    # the cache's batch axis follows input_ids; its max_len axis is fixed
    cache = [cfg.n_kv_heads, MAX_LEN, cfg.head_dim]
    assert decode["shapes"]["past_value_1"] == {
        "min": [1, *cache],
        "opt": [4, *cache],
        "max": [4, *cache],
    }
    assert "total_sequence_length" not in prefill["shapes"]  # a static scalar needs no profile
    assert set(prefill["shapes"]) == set(decode["shapes"])


@pytest.fixture(scope="module", params=["fp32", "fp16"])
def plan(request, model, tmp_path_factory):
    precision = request.param
    folder = tmp_path_factory.mktemp(f"trt-{precision}")
    graph = saved_graph(
        model, folder / "model.onnx", {"fp32": "float32", "fp16": "float16"}[precision]
    )
    info = build_engine(
        graph, folder / "model.plan", max_batch=MAX_BATCH, max_len=MAX_LEN, precision=precision
    )
    return precision, folder / "model.plan", info


@pytest.mark.gpu
@pytest.mark.skipif(
    not HAVE_TRT, reason="needs `pip install tensorrt` and an NVIDIA GPU with its driver"
)
@pytest.mark.parametrize("in_place", [True, False], ids=["in-place", "copy-back"])
def test_plan_decodes_like_eager(plan, model, in_place):
    precision, path, info = plan
    major, minor = torch.cuda.get_device_capability()
    assert info["gpu_arch"] == f"sm{major}{minor}" and info["precision"] == precision
    assert info["trt_version"] and [p["name"] for p in info["profiles"]] == ["prefill", "decode"]
    decoder = TrtDecoder(path, max_batch=MAX_BATCH, max_len=MAX_LEN, in_place=in_place)
    for prompt in PROMPTS:
        want = generate(model, prompt, 16)
        got = decoder.greedy(prompt, 16)
        with torch.no_grad():
            eager = model(torch.tensor([prompt + want]))[0, :-1].numpy()
        # every prompt position from one prefill, then decode steps through the cache
        diff = float(np.abs(decoder.logits(prompt, want[:-1]) - eager).max())
        first = next((i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b), None)
        print(
            f"TensorRT {info['trt_version']} {info['gpu_arch']} {precision} "
            f"{'in-place' if in_place else 'copy-back'} prompt={prompt}: "
            f"max |logit - eager| = {diff:.2e}, first greedy divergence: {first}"
        )
        assert diff <= TOLERANCE[precision]
        assert got == want
    # right-padded rows of different lengths, decoded together, equal each alone
    assert decoder.greedy_batch(PROMPTS, 12) == [generate(model, p, 12) for p in PROMPTS]
