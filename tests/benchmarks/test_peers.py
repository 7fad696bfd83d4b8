"""The pure parts of benchmarks/peers.py: its arguments, the medians and ratios of its table from
fake measurements, llama-perplexity's output (a captured run) and its base log-probabilities
file, read back and scored the way perplexity.cpp scores it."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from benchmarks import _llamacpp as lc
from benchmarks import _peers_report as report
from benchmarks import peers

DATA = Path(__file__).parent / "data"


# ── arguments ──


def test_defaults_are_the_published_run():
    args = peers.parse_args([])
    assert args.rounds == 2 and args.clients == [1, 8, 32] and args.tokens == 128
    assert args.threads == 2 and args.slots == 32 and args.max_len == 2048 and args.ctx == 16384
    assert args.targets == ["onnx-int4-kv16", "onnx-int4", "onnx-int8"]
    assert args.formats == ["Q4_1", "Q4_0", "Q4_K_M"]


def test_lists_parse_and_bad_values_name_the_flag(capsys):
    args = peers.parse_args(["--clients", "1,4", "--formats", "Q4_1", "--rounds", "1"])
    assert args.clients == [1, 4] and args.formats == ["Q4_1"] and args.rounds == 1
    for argv, flag in (
        (["--clients", "1,x"], "--clients"),
        (["--clients", "0"], "--clients"),
        (["--rounds", "0"], "--rounds=0"),
    ):
        with pytest.raises(SystemExit):
            peers.parse_args(argv)
        assert flag in capsys.readouterr().err


def test_a_request_must_fit_both_servers_contexts(capsys):
    # 32 slots over 4096 cells leave llama-server 128 positions a slot: too few for 128 tokens
    with pytest.raises(SystemExit):
        peers.parse_args(["--ctx", "4096"])
    assert "--ctx/--slots=128" in capsys.readouterr().err


def test_the_memory_block_must_fit_a_slot_of_both_servers(capsys):
    assert peers.parse_args([]).fill == 16384  # 32 slots × 512 positions: llama-server's -c
    assert peers.parse_args(["--fill", "0"]).fill == 0  # no memory block
    assert peers.parse_args(["--ctx", "8192", "--slots", "16"]).fill == 8192  # it follows --ctx
    with pytest.raises(SystemExit):
        peers.parse_args(["--fill", "32768"])  # 1024 a slot, llama-server's slots hold 512
    assert "--fill=32768 over 32 slots gives 1024 positions" in capsys.readouterr().err


def test_the_fill_prompt_leaves_room_for_its_output():
    class Words:  # one token a word
        def encode(self, text, add_special_tokens=False):
            return type("E", (), {"ids": text.split()})()

        def decode(self, ids):
            return " ".join(ids)

    text = peers.fill_prompt(Words(), 512)
    assert len(text.split()) == 512 - peers.fill_output(512) - peers.FILL_MARGIN
    assert peers.fill_output(512) == 256  # decoding still while the last prompts prefill
    with_bos = peers.fill_prompt(Words(), 512, bos=True)  # the server puts a BOS first
    assert len(with_bos.split()) == len(text.split()) - 1


def test_requests_are_the_same_for_every_server_and_unique():
    texts = ["short", "a longer prompt"]
    a, b = peers.bodies(texts, 5, 128), peers.bodies(texts, 5, 128)
    assert a == b
    assert len({body["prompt"] for body in a}) == 5
    assert all(body["ignore_eos"] and body["max_tokens"] == 128 and body["stream"] for body in a)
    # blocks numbered apart share no prompt: llama-server's prompt cache would reuse one
    later = peers.bodies(texts, 5, 128, first=1000)
    assert not {b["prompt"] for b in a} & {b["prompt"] for b in later}


# ── medians, ratios and the table ──


def _round(tok_s: dict[int, float], ttft: float, hwm: float, load: float = 1.0) -> dict:
    by = {
        n: {"tokens_per_s": v, "ttft_ms": ttft, "itl_ms": 10.0, "rss_peak_mib": hwm * 0.9}
        for n, v in tok_s.items()
    }
    return {"by_clients": by, "vm_hwm_mib": hwm, "load_average": load}


def _parity(passed: bool, forced: bool) -> dict:
    return {"passed": passed, "forced": forced, "ppl_increase": 0.18 if forced else 0.0004,
            "kl_mean": None, "top1_agreement": None, "held_out": "built-in"}  # fmt: skip


def _fid(kl: float, same: float, ln_ratio: float) -> dict:
    return {"ppl": 20.0, "ppl_base": 19.0, "ln_ppl_ratio": ln_ratio, "kl_mean": kl,
            "kl_median": kl, "kl_p99": 10 * kl, "kl_max": 20 * kl, "same_top": same}  # fmt: skip


def fake_results() -> dict:
    speed = {
        "ours onnx-int4": [_round({1: 120, 8: 300}, 50, 1000), _round({1: 100, 8: 280}, 60, 1100)],
        "llama-server Q4_1": [
            _round({1: 100, 8: 200}, 100, 500),
            _round({1: 100, 8: 200}, 100, 500),
        ],
        "ours onnx-int8": [_round({1: 90, 8: 330}, 70, 1500), _round({1: 90, 8: 310}, 70, 1500)],
        "llama-server Q4_0": [_round({1: 110, 8: 220}, 90, 450), _round({1: 130, 8: 240}, 90, 450)],
    }
    return {
        "machine": {"cpu": "Test CPU", "cores": 2, "flags": ["avx512f"],
                    "load_average": (1.0, 1.0, 1.0), "load_average_end": (2.0, 1.0, 1.0)},
        "llama_cpp": {"reports": "version: 1 (abc)", "sdist": "0.3.36"},
        "packages": {"onnx-int4": {"parity": _parity(False, True)},
                     "onnx-int8": {"parity": _parity(True, False)}},
        "speed": speed,
        "fidelity": {"text": "t.txt", "ppl_ctx": 256, "positions": 500, "F32": {"ppl": 19.0},
                     "Q4_1": _fid(1e-6, 0.999, 0.0), "Q4_0": _fid(0.05, 0.9, 0.05),
                     "onnx-int4": _fid(0.06, 0.88, 0.1), "onnx-int8": _fid(0.001, 0.99, 0.001)},
    }  # fmt: skip


def test_medians_over_rounds():
    med = report.medians(fake_results()["speed"]["ours onnx-int4"], [1, 8])
    assert med["by_clients"][1]["tokens_per_s"] == 110
    assert med["by_clients"][8]["ttft_ms"] == 55
    assert med["vm_hwm_mib"] == 1050


def test_rows_faithful_is_the_first_target_passing_without_force_fastest_by_throughput():
    r = fake_results()
    rows = report.pick_rows(r, ["onnx-int4", "onnx-int8"], ["Q4_1", "Q4_0"], "Q4_1")
    assert rows[0] == {"label": "faithful default", "ours": "onnx-int8", "theirs": "Q4_1"}
    # geometric means: int4 √(110·290) ≈ 178.6 > int8 √(90·320) ≈ 169.7; Q4_0 > Q4_1
    assert rows[1] == {"label": "fastest", "ours": "onnx-int4", "theirs": "Q4_0"}


def test_when_every_target_needed_force_the_closest_stands_in_labelled_so():
    r = fake_results()
    r["packages"]["onnx-int8"]["parity"] = _parity(False, True)
    r["packages"]["onnx-int8"]["parity"]["ppl_increase"] = 0.02  # int4's is 0.18
    rows = report.pick_rows(r, ["onnx-int4", "onnx-int8"], ["Q4_1", "Q4_0"], "Q4_1")
    assert rows[0] == {"label": "most faithful (no target passed)", "ours": "onnx-int8",
                       "theirs": "Q4_1"}  # fmt: skip
    r["packages"]["onnx-int4"]["parity"]["kl_mean"] = 0.01  # KL decides when reported
    r["packages"]["onnx-int8"]["parity"]["kl_mean"] = 0.02
    rows = report.pick_rows(r, ["onnx-int4", "onnx-int8"], ["Q4_1", "Q4_0"], "Q4_1")
    assert rows[0]["ours"] == "onnx-int4"


def test_ratios_are_of_the_medians_with_the_per_round_range():
    c = report.compare(fake_results(), "onnx-int4", "Q4_0")
    assert c[1]["tokens_per_s"] == pytest.approx(110 / 120)
    assert c[1]["tokens_per_s_range"] == pytest.approx((100 / 130, 120 / 110))
    assert c[8]["ttft_ms"] == pytest.approx(55 / 90)
    assert c["vm_hwm"] == pytest.approx(1050 / 450)
    assert c["fidelity"]["ours"]["kl_mean"] == 0.06 and c["fidelity"]["theirs"]["same_top"] == 0.9


def test_the_memory_block_is_a_ratio_of_its_sampled_peaks():
    r = fake_results()
    for name, peaks in (("ours onnx-int4", (700, 720)), ("llama-server Q4_0", (900, 1000))):
        for rnd, peak in zip(r["speed"][name], peaks, strict=True):
            rnd["fill"] = {"cached_tokens": 16384, "rss_peak_mib": peak, "requests": 32}
    c = report.compare(r, "onnx-int4", "Q4_0")
    assert c["fill_rss"] == pytest.approx(710 / 950) and c["fill_tokens"] == 16384
    assert "fill_rss" not in report.compare(r, "onnx-int4", "Q4_1")  # Q4_1 had no block
    args = peers.parse_args(
        ["--clients", "1,8", "--formats", "Q4_1,Q4_0", "--targets", "onnx-int4,onnx-int8"]
    )
    r["summary"] = report.summarize(r, args, "Q4_1")
    text = report.format_report(r)
    assert "RSS at 16384 cached tokens" in text
    fastest = next(ln for ln in text.splitlines() if ln.startswith("| fastest"))
    assert f"{710 / 950:.2f}×" in fastest
    assert "| ours onnx-int4 | 16384 cached tokens | | | | 710 |" in text


def test_the_report_prints_the_ratio_table():
    r = fake_results()
    args = peers.parse_args(
        ["--clients", "1,8", "--formats", "Q4_1,Q4_0", "--targets", "onnx-int4,onnx-int8"]
    )
    r["summary"] = report.summarize(r, args, "Q4_1")
    text = report.format_report(r)
    assert "Test CPU, 2 cores, avx512f" in text
    assert "ours onnx-int4: failed its gate, exported with force" in text
    assert "ours onnx-int8: passed its gate" in text
    faithful = next(ln for ln in text.splitlines() if ln.startswith("| faithful default"))
    # int8 against Q4_1: 90/100 at 1 client, 320/200 at 8, RSS 1500/500
    assert "0.90× (0.90–0.90)" in faithful and "1.60× (1.55–1.65)" in faithful
    assert "3.00×" in faithful and "0.00100 / 0.00000" in faithful
    fid = next(ln for ln in text.splitlines() if ln.startswith("| onnx-int4 |"))
    assert f"{100 * (20 / 19 - 1):+.2f}%" in fid  # its perplexity against the F32 run's


# ── llama-perplexity ──


def test_parses_a_captured_kl_divergence_run():
    figures = lc.parse_kl_output((DATA / "llama-perplexity-kld-Q4_0.txt").read_text())
    assert set(figures) >= {"ppl", "ppl_base", "ln_ppl_ratio", "kl_mean", "kl_p99", "same_top"}
    assert 0 < figures["same_top"] <= 1 and figures["kl_mean"] > 0
    assert figures["ppl"] == pytest.approx(
        figures["ppl_base"] * math.exp(figures["ln_ppl_ratio"]), rel=1e-3
    )


def test_parses_a_captured_base_run_and_refuses_other_output():
    base = lc.parse_kl_output((DATA / "llama-perplexity-base-F32.txt").read_text())
    assert base["ppl"] > 1 and "kl_mean" not in base
    with pytest.raises(ValueError):
        lc.parse_kl_output("main: error: failed to load model\n")


def _encode(logits: np.ndarray) -> np.ndarray:
    """perplexity.cpp's 16-bit log-softmax of one row (its log_softmax(..., uint16_t *)): a
    float32 scale and offset in the first four uint16s, then the quantized values."""
    logits = logits.astype(np.float32)
    mx, mn = logits.max(), max(logits.min(), logits.max() - 16)
    lse = np.float32(np.log(np.exp(logits - mx).astype(np.float64).sum()))
    scale = np.float32((mx - mn) / 65535.0)
    head = np.array([scale, mn - mx - lse], dtype=np.float32).view(np.uint16)
    q = np.where(logits > mn, np.rint((logits - mn) / scale), 0).astype(np.uint16)
    return np.concatenate([head, q])


def _write_base(path: Path, tokens: np.ndarray, ref_logits: np.ndarray, n_vocab: int) -> None:
    n_chunk, n_ctx = tokens.shape
    first = n_ctx // 2
    with open(path, "wb") as f:
        f.write(b"_logits_")
        f.write(np.array([n_ctx, n_vocab, n_chunk], dtype=np.int32).tobytes())
        f.write(tokens.astype(np.int32).tobytes())
        for c in range(n_chunk):
            for j in range(first, n_ctx - 1):
                f.write(_encode(ref_logits[c, j]).tobytes())  # n_vocab is even: no padding


def test_kl_figures_against_a_base_file(tmp_path):
    rng = np.random.default_rng(0)
    n_chunk, n_ctx, V = 3, 16, 50
    tokens = rng.integers(0, V, size=(n_chunk, n_ctx))
    ref = rng.normal(0, 3, size=(n_chunk, n_ctx, V))
    _write_base(tmp_path / "base.kld", tokens, ref, V)
    base = lc.KlBase.read(tmp_path / "base.kld")
    assert (base.n_ctx, base.n_vocab, base.scored) == (16, V, 7)
    assert (base.tokens == tokens).all()

    def logp(x):
        return (
            x
            - x.max(-1, keepdims=True)
            - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))
        )

    # the reference against itself: no divergence beyond the 16-bit storage, same top everywhere
    chunk_of = {tuple(tokens[c]): c for c in range(n_chunk)}
    same = lc.kl_figures(base, lambda ids: ref[chunk_of[tuple(ids)]], bos=None)
    assert same["positions"] == n_chunk * 7 and same["same_top"] == 1.0
    assert abs(same["kl_mean"]) < 1e-4 and same["ppl"] == pytest.approx(same["ppl_base"], rel=1e-3)

    # a perturbed model: KL, perplexity and top-1 agree with a direct float computation
    noisy = ref + rng.normal(0, 0.5, size=ref.shape)
    got = lc.kl_figures(base, lambda ids: noisy[chunk_of[tuple(ids)]], bos=None)
    p_ref, p_q = logp(ref[:, 8:15]), logp(noisy[:, 8:15])
    kl = (np.exp(p_ref) * (p_ref - p_q)).sum(-1)
    nll = -np.take_along_axis(p_q, tokens[:, 9:16, None], -1)
    assert got["kl_mean"] == pytest.approx(kl.mean(), rel=1e-3)
    assert got["kl_max"] == pytest.approx(kl.max(), rel=1e-3)
    assert got["ppl"] == pytest.approx(math.exp(nll.mean()), rel=1e-6)
    assert got["same_top"] == pytest.approx(
        (ref[:, 8:15].argmax(-1) == noisy[:, 8:15].argmax(-1)).mean()
    )


def test_kl_figures_put_a_bos_first_when_the_vocabulary_adds_one(tmp_path):
    rng = np.random.default_rng(1)
    tokens = rng.integers(2, 20, size=(2, 8))
    _write_base(tmp_path / "b.kld", tokens, rng.normal(size=(2, 8, 20)), 20)
    seen = []
    lc.kl_figures(lc.KlBase.read(tmp_path / "b.kld"),
                  lambda ids: seen.append(ids) or np.zeros((8, 20)), bos=1)  # fmt: skip
    assert [ids[0] for ids in seen] == [1, 1] and [ids[1:] for ids in seen] == tokens[
        :, 1:
    ].tolist()


def test_percentile_follows_perplexity_cpp():
    ordered = np.array([0.0, 1.0, 2.0, 10.0])
    assert lc._percentile(ordered, 0.5) == pytest.approx(1.5)
    assert lc._percentile(ordered, 0.99) == pytest.approx(2 + 0.97 * 8)
