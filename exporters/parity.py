"""Parity of an exported artifact with eager PyTorch on the same weights.

The reference is trainer/model.py on the checkpoint as imported or trained (for a GGUF import the
checkpoint already holds the file's exact dequantized weights). Measured against it:

- greedy decoding of a fixed prompt set, token for token (exact targets must match; others
  report where they first diverge);
- the largest absolute logit difference over every prefill and decode step of those prompts;
- fidelity on held-out text (the run's validation blocks when the checkpoint's run and data are
  at hand, else the built-in paragraphs below), teacher-forced: both models see the same tokens
  and, at every position, the perplexity of each, the KL divergence KL(reference ‖ target) over
  the full vocabulary, and whether both rank the same token first. These are the figures of
  llama.cpp's `llama-perplexity --kl-divergence` (mean/median/99th percentile/max KL, "Same top
  p"), computed from full-precision log-softmax rather than its 16-bit stored base.

The gate (`gate_failure`): a target passes when its perplexity is at most MAX_PPL_INCREASE
above the reference's and its top-1 agreement is at least MIN_TOP1_AGREEMENT; an exact target
must also decode greedily token for token as eager PyTorch does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from exporters.fidelity import Fidelity, FidelityMeter
from registry.manifest import ParityReport, PromptParity
from trainer.checkpoint import read_meta
from trainer.data import TokenDataset, tokenizer_fingerprint
from trainer.errors import DataError
from trainer.generate import generate
from trainer.model import Transformer
from trainer.tokenizer import Tokenizer

__all__ = [
    "MAX_PPL_INCREASE",
    "MIN_TOP1_AGREEMENT",
    "Decoder",
    "Fidelity",
    "FidelityMeter",
    "HeldOut",
    "ParityReport",
    "check_parity",
    "gate_failure",
    "held_out_text",
    "measure_fidelity",
    "summary",
]

# The gate every target is held to (llama.cpp's quantization tables read the same two figures):
# perplexity on the held-out text at most 1% above the reference's, and the same top token as
# the reference at no fewer than 98% of its positions.
MAX_PPL_INCREASE = 0.01
MIN_TOP1_AGREEMENT = 0.98

# Short and varied (prose, code, a chat turn is added when the tokenizer has a template); greedy
# decoding from each runs long enough to cross many decode steps.
PARITY_PROMPTS = [
    "The",
    "Once upon a time",
    "Return the",
    "def add(a, b):",
    "In this section we describe",
    "The results show that",
]
CHAT_PROMPT = "What does this function return?"
NEW_TOKENS = 32  # greedy tokens per prompt
MAX_SEQUENCES = 8  # held-out sequences scored
MAX_SEQUENCE_LEN = 512  # tokens per held-out sequence, at most

# Neutral prose and one piece of code, written for this check and not part of any corpus.
BUILTIN_HELD_OUT = [
    "The library opens at nine in the morning and closes at six in the evening. Visitors may "
    "borrow up to five books at a time, and each loan lasts three weeks. Books that are returned "
    "late are charged a small fee for every day past the due date, which helps to keep popular "
    "titles moving between readers.",
    "Rain fell steadily through the night, and by morning the river had risen above its banks. "
    "Farmers moved their animals to higher ground while the town council opened the school hall "
    "for families whose houses were at risk. By the afternoon the water began to fall again.",
    "A good recipe lists its ingredients in the order they are used. The cook reads the steps "
    "once from start to finish before beginning, measures everything in advance, and keeps the "
    "work surface clear, so that nothing is forgotten when the pan is already hot.",
    "The committee met on Tuesday to review the budget for the coming year. Most of the "
    "discussion concerned the cost of repairs to the old bridge, which engineers had inspected "
    "in the spring. A final decision was postponed until the next meeting.",
    "def moving_average(values, window):\n"
    '    """Return the averages of each run of `window` consecutive values."""\n'
    "    if window <= 0:\n"
    '        raise ValueError("window must be positive")\n'
    "    total = sum(values[:window])\n"
    "    averages = [total / window]\n"
    "    for i in range(window, len(values)):\n"
    "        total += values[i] - values[i - window]\n"
    "        averages.append(total / window)\n"
    "    return averages\n",
]


class Decoder(Protocol):
    """What parity needs from an artifact's runner (exporters/runner.py's OrtDecoder)."""

    def greedy(
        self, prompt_ids: list[int], max_tokens: int, stop_ids: Sequence[int] = ()
    ) -> list[int]:
        """Argmax decoding: up to max_tokens new ids; stops at a stop id, which is not returned."""
        ...

    def logits(self, prompt_ids: list[int], decode_ids: Sequence[int] = ()) -> np.ndarray:
        """(len(prompt_ids) + len(decode_ids), V) float logits: the prompt in one prefill call
        (every position), then each decode id as one step through the KV cache; row i is the
        prediction after token i of prompt_ids + decode_ids."""
        ...


@dataclass
class HeldOut:
    source: str  # where the sequences come from, as recorded in the report
    sequences: list[list[int]]  # each at least two tokens long

    @property
    def n_tokens(self) -> int:
        return sum(len(s) - 1 for s in self.sequences)  # tokens scored (each predicted once)


def held_out_text(checkpoint_dir: Path, tokenizer: Tokenizer, max_len: int) -> HeldOut:
    """The run's validation blocks when the checkpoint came from a training run whose data is
    still there (and was tokenized with this tokenizer); else the built-in paragraphs."""
    length = min(max_len, MAX_SEQUENCE_LEN)
    from_run = _run_validation_blocks(Path(checkpoint_dir), tokenizer, length)
    if from_run is not None:
        return from_run
    sequences = [ids[:length] for ids in tokenizer.encode_batch(BUILTIN_HELD_OUT)]
    sequences = [s for s in sequences if len(s) >= 2]
    n_prose = len(BUILTIN_HELD_OUT) - 1
    return HeldOut(f"built-in held-out text ({n_prose} prose paragraphs, 1 code)", sequences)


@torch.no_grad()
def check_parity(
    model: Transformer,
    tokenizer: Tokenizer,
    decoder: Decoder,
    target: str,
    *,
    exact: bool,
    max_len: int,
    held_out: HeldOut,
    max_ppl_increase: float = MAX_PPL_INCREASE,
    min_top1_agreement: float = MIN_TOP1_AGREEMENT,
) -> ParityReport:
    """Compares `decoder` to eager `model`; the report passes or fails by `gate_failure`.
    `exact`: greedy decoding must also match token for token (fp32 targets)."""
    limit = min(max_len, model.cfg.max_seq_len)
    stop_ids = tokenizer.stop_ids
    results, max_diff = [], 0.0
    for text, ids in _prompts(tokenizer):
        n = min(NEW_TOKENS, limit - len(ids))
        if n < 1:
            continue
        want = generate(model, ids, n, stop_ids=stop_ids)
        got = list(decoder.greedy(ids, n, stop_ids=stop_ids))
        results.append(_compare(text, want, got))
        max_diff = max(max_diff, _max_logit_diff(model, decoder, ids, want))
    if not results:
        raise ValueError(f"max_len={max_len} leaves no room to decode any parity prompt")
    fid = measure_fidelity(model, decoder, held_out.sequences)
    report = ParityReport(
        target=target,
        exact=exact,
        prompts=results,
        tokens_matched=sum(r.tokens_matched for r in results),
        tokens_total=sum(r.tokens_total for r in results),
        max_abs_logit_diff=max_diff,
        held_out=held_out.source,
        held_out_tokens=held_out.n_tokens,
        ppl_eager=fid.ppl_ref,
        ppl_target=fid.ppl_target,
        ppl_increase=fid.ppl_target / fid.ppl_ref - 1,
        max_ppl_increase=max_ppl_increase,
        passed=True,
        reason="",
        kl_mean=fid.kl_mean,
        kl_median=fid.kl_median,
        kl_p99=fid.kl_p99,
        kl_max=fid.kl_max,
        top1_agreement=fid.top1_agreement,
        positions=fid.positions,
        min_top1_agreement=min_top1_agreement,
    )
    report.reason = gate_failure(report)
    report.passed = not report.reason
    return report


def gate_failure(r: ParityReport) -> str:
    """Why the report fails the gate, or "" when it passes; each reason names the figure, its
    value and the limit."""
    reasons = []
    if not all(map(math.isfinite, (r.max_abs_logit_diff, r.ppl_target, r.kl_mean or 0.0))):
        reasons.append("the artifact produced non-finite logits")
    diverged = [p for p in r.prompts if p.first_divergence is not None]
    if r.exact and diverged:
        first = diverged[0]
        reasons.append(
            f"greedy decoding diverged from eager PyTorch on {len(diverged)} of {len(r.prompts)} "
            f"prompts (first: {first.prompt!r} at token {first.first_divergence}); an exact "
            "target must match token for token"
        )
    if not r.ppl_target <= r.ppl_eager * (1 + r.max_ppl_increase):
        reasons.append(
            f"perplexity {r.ppl_increase:+.2%} > +{_percent(r.max_ppl_increase)} "
            f"(reference {r.ppl_eager:.3f} → {r.ppl_target:.3f})"
        )
    limit = r.min_top1_agreement
    if limit is not None and not (r.top1_agreement or 0.0) >= limit:
        shown = _percent(r.top1_agreement or 0.0, unlike=limit)
        reasons.append(f"top-1 agreement {shown} < {_percent(limit)}")
    return "; ".join(reasons)


def summary(report: ParityReport) -> str:
    """One line for a terminal: the gate's figures first, then greedy agreement."""
    r = report
    verdict = "passed" if r.passed else ("FORCED" if r.forced else "FAILED")
    parts = [f"perplexity {r.ppl_eager:.3f} → {r.ppl_target:.3f} ({r.ppl_increase:+.2%})"]
    if r.top1_agreement is not None:
        parts.append(f"top-1 agreement {r.top1_agreement:.2%}")
    if r.kl_mean is not None:
        parts.append(f"KL mean {r.kl_mean:.2e} p99 {r.kl_p99:.2e} max {r.kl_max:.2e}")
    positions = r.positions or r.held_out_tokens
    parts[-1] += f" over {positions} positions of {r.held_out}"
    parts.append(
        f"greedy {r.tokens_matched}/{r.tokens_total} tokens match, "
        f"max |Δlogit| {r.max_abs_logit_diff:.2e}"
    )
    line = f"{r.target}: {verdict}: " + ", ".join(parts)
    return f"{line}; {r.reason}" if r.reason else line


def _percent(value: float, unlike: float | None = None) -> str:
    """`value` as a percentage, "98%" rather than "98.00%"; with `unlike`, with as many digits
    as it takes not to print the same figure (97.95% < 98%, not 98.0% < 98%)."""
    for digits in range(1, 5):
        if unlike is None or round(value * 100, digits) != round(unlike * 100, digits):
            break
    return f"{round(value * 100, digits):g}%"


# --- fidelity on held-out text -----------------------------------------------------------------


def measure_fidelity(model: Transformer, decoder: Decoder, sequences: list[list[int]]) -> Fidelity:
    """Both models teacher-forced on each sequence: row i of each predicts token i + 1. The
    target runs each sequence (less its last token, which predicts nothing) as one prefill."""
    meter = FidelityMeter()
    with torch.no_grad():
        for seq in sequences:
            context = seq[:-1]
            ref = model(torch.tensor([context]))[0].float().numpy()  # (T-1, V)
            got = np.asarray(decoder.logits(context))
            if got.shape != ref.shape:
                raise ValueError(
                    f"decoder.logits returned shape {got.shape} for {len(context)} tokens; "
                    f"fidelity needs {ref.shape}: one row per position"
                )
            meter.add(ref, got, seq[1:])
    return meter.result()


# --- greedy decoding of the prompts ------------------------------------------------------------


def _prompts(tokenizer: Tokenizer) -> list[tuple[str, list[int]]]:
    texts = list(PARITY_PROMPTS)
    if tokenizer.chat_template is not None:
        texts.append(tokenizer.render_chat([{"role": "user", "content": CHAT_PROMPT}], True))
    return [(t, ids) for t, ids in zip(texts, tokenizer.encode_batch(texts), strict=True) if ids]


def _compare(prompt: str, want: list[int], got: list[int]) -> PromptParity:
    matched = 0
    for a, b in zip(want, got, strict=False):
        if a != b:
            break
        matched += 1
    diverged = matched < len(want) or len(got) != len(want)
    return PromptParity(
        prompt=prompt,
        tokens_matched=matched,
        tokens_total=len(want),
        first_divergence=matched if diverged else None,
    )


def _max_logit_diff(model: Transformer, decoder: Decoder, ids: list[int], cont: list[int]) -> float:
    # the eager reference runs the whole sequence at once: the same math as prefill + decode
    want = model(torch.tensor([ids + cont]))[0].float().numpy()  # (T+N, V)
    got = np.asarray(decoder.logits(ids, cont), dtype=np.float32)
    if got.shape != want.shape:
        raise ValueError(
            f"decoder.logits returned shape {got.shape}; parity needs {want.shape} "
            "(one row per prompt and decode token)"
        )
    diff = np.abs(got - want).max()
    return float(diff) if np.isfinite(diff) else math.inf


# --- held-out text from a training run ----------------------------------------------------------


def _run_validation_blocks(folder: Path, tokenizer: Tokenizer, length: int) -> HeldOut | None:
    folder = folder.resolve()
    candidates = [folder.parent.parent if folder.parent.name == "checkpoints" else None]
    candidates.append(folder.parent if folder.name == "best" else None)
    run = read_meta(folder).get("lineage", {}).get("run")
    candidates.append(Path(run) if run else None)
    for run_dir in filter(None, candidates):
        data_dir = run_dir / "data"
        if not (run_dir / "train_config.json").is_file() or not data_dir.is_dir():
            continue
        try:
            ds = TokenDataset.open(data_dir)
        except (DataError, OSError, ValueError):
            continue
        if ds.meta.get("tokenizer_fingerprint") != tokenizer_fingerprint(tokenizer):
            continue
        ids = ds.val_block_ids()[:MAX_SEQUENCES]
        if len(ids) == 0:
            continue
        T = ds.block_size
        sequences = [
            ds.tokens[i * T : i * T + T + 1][:length].astype(np.int64).tolist() for i in ids
        ]
        return HeldOut(
            f"validation blocks of run {run_dir} ({len(ids)} of {ds.n_val_blocks} blocks, "
            f"{len(sequences[0])} tokens each)",
            sequences,
        )
    return None
