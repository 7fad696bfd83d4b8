"""Export to a model package: validation before work, atomicity, parity gates, the CLI, and an
end-to-end export of a tiny trained run through ONNX Runtime.

Most tests swap the graph builders and the ONNX Runtime decoder for fakes backed by the eager
model (exporters.targets.BUILDERS / DECODERS), so they test the packaging, not the graphs."""

from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import pytest
import torch

from exporters import targets
from exporters.errors import ExportError, ParityError
from exporters.package import choose_artifact, export, generate_from_package, is_package
from exporters.parity import check_parity, held_out_text
from registry.manifest import Quantization, load, sha256_file, verify
from tests.conftest import run_cli, tiny_overrides
from trainer import train
from trainer.checkpoint import load_model, resolve, write_checkpoint
from trainer.config import ModelConfig, build_train_config
from trainer.generate import generate
from trainer.model import Transformer
from trainer.tokenizer import train_bpe


class EagerDecoder:
    """Parity's Decoder protocol on the eager model; `sharpen` multiplies every logit (the same
    top token, a more confident and so worse model), `wrong` shifts every greedy token (a broken
    graph)."""

    def __init__(self, model, sharpen: float = 1.0, wrong: bool = False):
        self.model, self.sharpen, self.wrong = model, sharpen, wrong

    @torch.no_grad()
    def greedy(self, prompt_ids, max_tokens, stop_ids=()):
        out = generate(self.model, prompt_ids, max_tokens, stop_ids=stop_ids)
        return [(t + 1) % self.model.cfg.vocab_size for t in out] if self.wrong else out

    @torch.no_grad()
    def logits(self, prompt_ids, decode_ids=()):
        x = torch.tensor([list(prompt_ids) + list(decode_ids)])
        return (self.model(x)[0] * self.sharpen).numpy()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, corpus_file):
    """A checkpoint of a randomly initialised tiny model with a trained tokenizer."""
    tokenizer = train_bpe(iter([corpus_file.read_text()]), 300)
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=tokenizer.vocab_size,
        dim=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        ffn_dim=64,
        max_seq_len=64,
    )
    meta = {"step": 7, "lineage": {"dataset_sha256": "cd" * 32, "code_revision": "abc123"}}
    folder = tmp_path_factory.mktemp("ckpt") / "step-7"
    return write_checkpoint(folder, Transformer(cfg), tokenizer, meta)


@pytest.fixture
def fakes(monkeypatch, checkpoint):
    """Fake builders (one small file per artifact) and eager decoders; returns the dict of
    decoders by target, which a test may change, and the list of decoder paths opened."""
    model, _, _ = load_model(checkpoint)
    by_target, opened = {}, []

    def build(build, spec, folder):
        (folder / "model.onnx").write_bytes(f"fake {folder.name}".encode())
        quant = spec.bits and Quantization(
            method="MatMulNBits", bits=spec.bits, block_size=32, symmetric=True, accuracy_level=4
        )
        return {"entry": f"{folder.name}/model.onnx", "quantization": quant or None}

    def decoder(path, max_len, threads):
        opened.append(path)
        return by_target.get(path.parent.name) or EagerDecoder(model)

    monkeypatch.setitem(targets.BUILDERS, "ort", build)
    monkeypatch.setitem(targets.BUILDERS, "portable", build)
    monkeypatch.setitem(targets.DECODERS, "onnxruntime", decoder)
    return by_target, opened, model


def leftovers(parent) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".staging-" in p.name)


def test_export_writes_a_complete_verified_package(fakes, checkpoint, tmp_path):
    pkg = export(checkpoint, ["onnx-fp32", "onnx-int4"], tmp_path / "pkg")
    assert pkg == (tmp_path / "pkg").resolve() and is_package(pkg)
    assert verify(pkg) == [] and leftovers(tmp_path) == []
    m = load(pkg)
    assert [a.target for a in m.artifacts] == ["onnx-fp32", "onnx-int4"]
    assert (
        m.artifact("onnx-int4").quantization.bits == 4
        and m.artifact("onnx-fp32").quantization is None
    )
    assert [f.path for f in m.tokenizer.files] == [
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    ]
    assert (pkg / "chat_template.jinja").read_text() == m.tokenizer.chat_template
    assert m.tokenizer.stop_ids == m.generation.stop_ids and len(m.tokenizer.stop_ids) == 2
    assert m.model.dim == 32 and m.model.head_dim == 8 and m.max_context == 64
    assert m.lineage.checkpoint_sha256 == sha256_file(checkpoint / "model.safetensors")
    assert m.lineage.dataset_sha256 == "cd" * 32 and m.lineage.checkpoint_step == 7
    fp32 = m.reports.parity["onnx-fp32"]
    assert fp32.passed and fp32.exact and fp32.tokens_matched == fp32.tokens_total > 0
    assert fp32.max_abs_logit_diff == 0 and fp32.ppl_increase == pytest.approx(0, abs=1e-5)
    assert fp32.held_out.startswith("built-in held-out text")
    assert len(fp32.prompts) == 7  # six fixed prompts and a chat turn
    assert not m.reports.parity["onnx-int4"].exact


def test_generate_prefers_the_quantized_artifact_and_matches_eager(fakes, checkpoint, tmp_path):
    _, opened, model = fakes
    pkg = export(checkpoint, ["onnx-fp32", "onnx-int4"], tmp_path / "pkg")
    opened.clear()
    _, tokenizer, _ = load_model(checkpoint)
    prompt = tokenizer.encode("Return the")
    got = generate_from_package(pkg, prompt, 10, stop_ids=tokenizer.stop_ids)
    assert got == generate(model, prompt, 10, stop_ids=tokenizer.stop_ids)
    assert [p.parent.name for p in opened] == ["onnx-int4"]
    generate_from_package(pkg, prompt, 10, target="onnx-fp32")
    assert opened[-1].parent.name == "onnx-fp32"
    with pytest.raises(ExportError, match="exceeds|between"):
        generate_from_package(pkg, prompt, 64)
    (pkg / "onnx-fp32" / "model.onnx").write_bytes(b"tampered!")
    with pytest.raises(ExportError, match="damaged: onnx-fp32/model.onnx has 9 bytes"):
        generate_from_package(pkg, prompt, 4, target="onnx-fp32")


def test_choose_artifact_ranks_passed_then_fewer_bits_then_ort(fakes, checkpoint, tmp_path):
    m = load(export(checkpoint, ["onnx-portable-fp32", "onnx-fp32", "onnx-int8"], tmp_path / "p"))
    assert choose_artifact(m).target == "onnx-int8"
    m.reports.parity["onnx-int8"].passed = False  # a forced artifact is the last resort
    assert choose_artifact(m).target == "onnx-fp32"
    m.artifacts = [a for a in m.artifacts if a.target != "onnx-fp32"]
    assert choose_artifact(m).target == "onnx-portable-fp32"


def test_unknown_target_is_refused_before_any_work(tmp_path):
    with pytest.raises(ExportError) as e:
        export(tmp_path / "no-such-checkpoint", ["onnx-fp32", "onnx-fp64"], tmp_path / "pkg")
    assert str(e.value) == (
        "unknown target 'onnx-fp64'; known targets: onnx-fp32, onnx-int4, onnx-int8, "
        "onnx-fp32-kv16, onnx-int4-kv16, onnx-int8-kv16, onnx-portable-fp32, trt-fp16"
    )
    assert list(tmp_path.iterdir()) == []


def test_a_non_empty_out_dir_is_refused_and_an_empty_one_is_used(fakes, checkpoint, tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="already exists and is not empty"):
        export(checkpoint, ["onnx-fp32"], tmp_path / "pkg")
    assert [p.name for p in (tmp_path / "pkg").iterdir()] == ["keep.txt"]
    (tmp_path / "empty").mkdir()
    assert verify(export(checkpoint, ["onnx-fp32"], tmp_path / "empty")) == []


def test_a_corrupt_checkpoint_is_refused_clearly(checkpoint, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(checkpoint, bad)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(
        ExportError, match=r"cannot export .*model.safetensors cannot be read as safetensors"
    ):
        export(bad, ["onnx-fp32"], tmp_path / "pkg")
    (bad / "config.json").unlink()
    with pytest.raises(ExportError, match="not a complete checkpoint: missing config.json"):
        export(bad, ["onnx-fp32"], tmp_path / "pkg")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]


@pytest.mark.parametrize("error", [RuntimeError("disk on fire"), KeyboardInterrupt()])
@pytest.mark.parametrize("step", ["build", "manifest"])
def test_a_failed_export_leaves_nothing(fakes, checkpoint, tmp_path, monkeypatch, error, step):
    if step == "build":  # the second artifact fails after the first is built and checked

        def fail(build, spec, folder):
            assert (build.root / "onnx-fp32" / "model.onnx").is_file()
            raise error

        monkeypatch.setitem(targets.BUILDERS, "portable", fail)
    else:  # the last step before the rename

        def fail(manifest):
            raise error

        monkeypatch.setattr("exporters.package.encode", fail)
    with pytest.raises(type(error)):
        export(checkpoint, ["onnx-fp32", "onnx-portable-fp32"], tmp_path / "out" / "pkg")
    assert list((tmp_path / "out").iterdir()) == []


def test_an_exact_target_that_diverges_fails_the_export(fakes, checkpoint, tmp_path):
    by_target, _, model = fakes
    by_target["onnx-fp32"] = EagerDecoder(model, wrong=True)
    with pytest.raises(ParityError, match=r"onnx-fp32 failed .* diverged .* on 7 of 7 prompts"):
        export(checkpoint, ["onnx-fp32"], tmp_path / "pkg", force=True)  # force cannot help
    assert list(tmp_path.iterdir()) == []


def test_a_quantized_target_past_the_perplexity_limit_needs_force(fakes, checkpoint, tmp_path):
    by_target, _, model = fakes
    by_target["onnx-int4"] = EagerDecoder(model, sharpen=3.0)  # same top tokens, worse ppl
    _, tokenizer, _ = load_model(checkpoint)
    held = held_out_text(checkpoint, tokenizer, 64)
    rise = _perplexity(model, held.sequences, 3.0) / _perplexity(model, held.sequences, 1.0) - 1
    assert rise > 0.01
    with pytest.raises(ParityError, match=rf"perplexity \+{rise:.2%} > \+1% .*--force"):
        export(checkpoint, ["onnx-fp32", "onnx-int4"], tmp_path / "pkg")
    assert list(tmp_path.iterdir()) == []
    m = load(export(checkpoint, ["onnx-fp32", "onnx-int4"], tmp_path / "pkg", force=True))
    report = m.reports.parity["onnx-int4"]
    assert report.forced and not report.passed and report.reason.startswith("perplexity +")
    assert report.ppl_increase == pytest.approx(rise, rel=1e-6)
    assert report.top1_agreement == 1.0  # sharpening keeps every argmax: perplexity alone fails
    assert m.reports.parity["onnx-fp32"].passed and not m.reports.parity["onnx-fp32"].forced


@torch.no_grad()
def _perplexity(model, sequences, sharpen: float) -> float:
    nll, n = 0.0, 0
    for seq in sequences:
        x = torch.tensor([seq])
        logp = torch.log_softmax(model(x)[0, :-1].double() * sharpen, -1)
        nll -= logp.gather(1, x[0, 1:, None]).sum().item()
        n += len(seq) - 1
    return float(np.exp(nll / n))


def test_tensorrt_target_without_tensorrt_names_the_package(checkpoint, tmp_path):
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is installed here")
    with pytest.raises(ExportError, match=r"trt-fp16 needs the TensorRT Python package `tensorrt`"):
        export(checkpoint, ["onnx-fp32", "trt-fp16"], tmp_path / "pkg")
    assert list(tmp_path.iterdir()) == []


def test_cli_errors_are_one_line_and_exit_2(checkpoint, tmp_path):
    r = run_cli("export", str(checkpoint), "--targets", "onnx-fp64", "--out", str(tmp_path / "p"))
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith(
        "aimass: error: unknown target 'onnx-fp64'; known targets: onnx-fp32"
    )
    assert r.stderr.count("\n") == 1
    r = run_cli("export", str(tmp_path / "nothing"), "--out", str(tmp_path / "p"))
    assert r.returncode == 2 and "is not a checkpoint or run folder" in r.stderr
    assert not (tmp_path / "p").exists()


# --- with the real ONNX Runtime graph and runner ----------------------------------------------


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, corpus_file):
    run_dir = tmp_path_factory.mktemp("run") / "run"
    cfg = build_train_config(
        "tiny",
        None,
        tiny_overrides(max_steps=60, eval_every=30, **{"model.dim": 64, "model.ffn_dim": 128}),
    )
    train.prepare_run(cfg, corpus_file, run_dir)
    train.run(train.load_run_config(run_dir), run_dir)
    return run_dir


def test_held_out_text_is_the_runs_validation_blocks(trained_run, checkpoint):
    _, tokenizer, _ = load_model(trained_run)
    held = held_out_text(resolve(trained_run), tokenizer, max_len=64)
    data = json.loads((trained_run / "data" / "dataset.json").read_text())
    assert held.source.startswith(f"validation blocks of run {trained_run} (")
    assert len(held.sequences) == min(8, data["n_val_blocks"])
    assert all(len(s) == 33 for s in held.sequences)  # block_size + 1
    # a checkpoint from elsewhere (another tokenizer, no run) falls back to the built-in text
    _, other, _ = load_model(checkpoint)
    assert held_out_text(checkpoint, other, 64).source.startswith("built-in")


def test_check_parity_of_the_eager_model_against_itself(checkpoint):
    model, tokenizer, _ = load_model(checkpoint)
    held = held_out_text(checkpoint, tokenizer, 64)
    r = check_parity(
        model, tokenizer, EagerDecoder(model), "x", exact=True, max_len=16, held_out=held
    )
    assert r.passed and r.reason == "" and r.tokens_matched == r.tokens_total
    assert all(p.first_divergence is None for p in r.prompts)
    assert held.n_tokens == r.held_out_tokens > 100


def test_end_to_end_export_and_generate(trained_run, tmp_path):
    pkg = tmp_path / "pkg"
    r = run_cli("export", str(trained_run), "--targets", "onnx-fp32,onnx-int4", "--out", str(pkg))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(pkg.resolve())
    assert "onnx-fp32: passed: perplexity" in r.stderr and "onnx-int4: passed: " in r.stderr
    assert verify(pkg) == []
    m = load(pkg)
    listed = {f.path for a in m.artifacts for f in a.files}
    assert listed == {
        "onnx-fp32/model.onnx",
        "onnx-fp32/model.onnx.data",
        "onnx-int4/model.onnx",
        "onnx-int4/model.onnx.data",
    }
    fp32 = m.reports.parity["onnx-fp32"]
    assert fp32.passed and fp32.exact and fp32.tokens_matched == fp32.tokens_total
    assert fp32.max_abs_logit_diff < 1e-3
    assert fp32.held_out.startswith("validation blocks of run")
    assert m.artifact("onnx-int4").quantization == Quantization(
        method="MatMulNBits", bits=4, block_size=32, symmetric=True, accuracy_level=4
    )
    assert m.lineage.run == str(trained_run) and m.lineage.checkpoint_step == 60

    model, tokenizer, _ = load_model(trained_run)
    prompt = tokenizer.encode("Return the")
    want = generate(model, prompt, 20, stop_ids=tokenizer.stop_ids)
    got = generate_from_package(pkg, prompt, 20, target="onnx-fp32", stop_ids=tokenizer.stop_ids)
    assert tokenizer.decode(got) == tokenizer.decode(want)
    assert len(generate_from_package(pkg, prompt, 5)) <= 5  # the default, int4, runs too

    # the acceptance command: the fp32 target prints what the checkpoint prints
    args = ["--prompt", "Return the", "--max-tokens", "20", "--temperature", "0"]
    from_ckpt = run_cli("generate", str(trained_run), *args)
    from_pkg = run_cli("generate", str(pkg), "--target", "onnx-fp32", *args)
    assert from_pkg.returncode == 0, from_pkg.stderr
    assert from_pkg.stdout == from_ckpt.stdout
    sampled = [
        run_cli("generate", str(pkg), *args[:4], "--temperature", "0.8", "--seed", "5")
        for _ in range(2)
    ]
    assert sampled[0].returncode == 0 and sampled[0].stdout == sampled[1].stdout
    bad = run_cli("generate", str(pkg), "--target", "trt-fp16", *args)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


@pytest.mark.gpu
def test_tensorrt_fp16_target_on_a_gpu(trained_run, tmp_path):
    pytest.importorskip("tensorrt")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    pkg = export(trained_run, ["onnx-fp32", "trt-fp16"], tmp_path / "pkg")
    assert verify(pkg) == []
    trt = load(pkg).artifact("trt-fp16")
    assert trt.runtime == "tensorrt" and trt.entry == "trt-fp16/model.plan"
    assert trt.gpu_arch.startswith("sm") and trt.trt_version and trt.precision == "fp16"
    assert [f.path for f in trt.files] == ["trt-fp16/model.plan"]  # the scratch graph is gone
    assert load(pkg).reports.parity["trt-fp16"].passed
