"""The engine on TensorRT plans (engine/trt_runner.py).

Without TensorRT: loading a plan target says what to install, and a plan built elsewhere is
refused with both versions named. With `tensorrt` and an NVIDIA GPU (`pytest -m gpu -s
tests/engine/test_tensorrt.py`): a plan of the tiny model serves through the engine's scheduler
(joins, leaves, chunked prompts, slot compaction) and its greedy output equals eager PyTorch's.
"""

from __future__ import annotations

import importlib.util
import sys

import onnx
import pytest
import torch

from engine.core import EngineCore
from engine.detokenizer import TokenBytes
from engine.loader import EngineConfig, LoadError, open_core
from engine.request import EngineRequest, SamplingParams
from engine.runner import ProviderUnavailable
from engine.scheduler import SchedulerConfig
from engine.trt_runner import check_plan
from tests.engine.plans import with_plan_artifact
from trainer.checkpoint import load_model
from trainer.generate import generate

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()
PROMPTS = [[5, 17, 42, 7], [1, 2, 3], [100, 200, 300, 400, 500], [3, 1, 4, 1, 5, 9, 2, 6]]
MAX_LEN = 64


def test_a_plan_target_without_tensorrt_says_what_to_install(tiny_package, tmp_path, monkeypatch):
    pkg = with_plan_artifact(tiny_package, tmp_path)
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError
    with pytest.raises(LoadError, match=r"trt-fp16: TensorRT targets need tensorrt: `pip install"):
        open_core(pkg, EngineConfig(target="trt-fp16", n_slots=4))
    # the plan's batch bounds the slots, checked before TensorRT is needed
    with pytest.raises(
        LoadError, match=r"at most 16 sequences per step; --slots \(n_slots\) is 32"
    ):
        open_core(pkg, EngineConfig(target="trt-fp16", n_slots=32))
    # a plan is never picked by default: it is tied to the GPU and TensorRT that built it
    assert open_core(pkg, EngineConfig(n_slots=1))[1].target.startswith("onnx-")


def test_a_plan_from_another_tensorrt_or_gpu_is_refused_with_both_named():
    check_plan("10.9.0.34", "sm90", "10.9.0.34", "sm90")  # the builder's version and GPU: runs
    # TensorRT deserializes a plan only on the exact version that built it
    with pytest.raises(ProviderUnavailable, match=r"TensorRT 10\.9\.0\.34; .* has 10\.9\.1\.2"):
        check_plan("10.9.0.34", "sm90", "10.9.1.2", "sm90")
    with pytest.raises(ProviderUnavailable, match=r"architecture sm90; this GPU is sm89"):
        check_plan("10.9.0", "sm90", "10.9.0", "sm89")


@pytest.fixture(scope="module")
def fp32_plan(tiny_run, tmp_path_factory):
    from exporters.portable import build_portable_graph
    from exporters.tensorrt import build_engine

    model, _, _ = load_model(tiny_run)
    folder = tmp_path_factory.mktemp("trt-engine")
    onnx.save(build_portable_graph(model, MAX_LEN, dtype="float32"), folder / "model.onnx")
    build_engine(
        folder / "model.onnx", folder / "model.plan", max_batch=4, max_len=MAX_LEN, precision="fp32"
    )
    return model, folder / "model.plan"


@pytest.mark.gpu
@pytest.mark.skipif(
    not HAVE_TRT, reason="needs `pip install tensorrt` and an NVIDIA GPU with its driver"
)
def test_a_plan_serves_through_the_scheduler_like_eager_greedy(fp32_plan, tiny_package):
    from engine.trt_runner import TrtRunner

    model, plan = fp32_plan
    runner = TrtRunner(plan, n_slots=3, max_len=MAX_LEN)
    token_bytes = TokenBytes((tiny_package / "tokenizer.json").read_text(encoding="utf-8"))
    # 3 slots, a budget of 6 tokens: prompts are chunked, requests join and leave every few
    # steps and the tail compacts (device-side row moves)
    config = SchedulerConfig(
        n_slots=3, max_len=MAX_LEN, token_budget=6, max_waiting=16, retry_after_s=1.0
    )
    core = EngineCore(runner, config, token_bytes)
    moves, move = [], runner.move
    runner.move = lambda *a: (moves.append(a), move(*a))
    lengths = [12, 5, 20, 9]
    for i, prompt in enumerate(PROMPTS):
        core.add(
            EngineRequest(
                f"r{i}", tuple(prompt), lengths[i], sampling=SamplingParams(temperature=0)
            )
        )
    tokens: dict[str, list[int]] = {}
    while core.has_work():
        for out in core.step():
            tokens.setdefault(out.request_id, []).extend(out.token_ids)
    for i, prompt in enumerate(PROMPTS):
        assert tokens[f"r{i}"] == generate(model, prompt, lengths[i]), i
    assert moves, "the tail should compact the running requests"
