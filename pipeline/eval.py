"""Evaluating a candidate against the version in production, on the same held-out text.

Both packages run through the exporters' own decoder (exporters.package.open_decoder: the
artifact's runtime, files checked against the manifest first), teacher-forced over the held-out
text: the summed negative log-likelihood of every token after the first of each sequence gives
the perplexity per token and the bits per byte of the text scored. Two versions with the same
tokenizer (the same tokenizer.json bytes) are compared by perplexity; otherwise by bits per byte,
since a token of one vocabulary is not a token of the other.

The fixed prompt set is the exporters' parity prompts: greedy answers of both versions, recorded
side by side for a reader (they are not a gate).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from exporters.package import open_decoder
from exporters.parity import BUILTIN_HELD_OUT, PARITY_PROMPTS
from registry.manifest import load
from trainer.tokenizer import Tokenizer

PROMPT_TOKENS = 16  # greedy tokens per prompt of the fixed set


@dataclass(frozen=True)
class HeldOut:
    texts: list[str]  # paragraphs, each scored as one sequence (cut to the context)
    source: str  # where they came from, for the report

    @property
    def dataset(self) -> str:
        """What the registry's perplexity gate matches on: the text's own digest."""
        joined = "\n\n".join(self.texts).encode()
        return f"held-out sha256:{hashlib.sha256(joined).hexdigest()[:16]}"


def builtin_held_out() -> HeldOut:
    return HeldOut(list(BUILTIN_HELD_OUT), "the exporters' built-in held-out paragraphs")


def read_held_out(path: str | Path) -> HeldOut:
    """Paragraphs of a text file (separated by blank lines); ValueError naming the file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--held-out {path}: {e}") from None
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
    if not paragraphs:
        raise ValueError(f"--held-out {path}: the file holds no text (need at least 1 paragraph)")
    return HeldOut(paragraphs, f"{path} ({len(paragraphs)} paragraphs)")


@dataclass
class Score:
    nll: float  # nats, summed over the scored tokens
    tokens: int  # tokens scored
    bytes: int  # UTF-8 bytes of the scored text

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.tokens)

    @property
    def bits_per_byte(self) -> float:
        return self.nll / math.log(2) / self.bytes

    def figures(self) -> dict:
        return {
            "perplexity": round(self.perplexity, 4),
            "bits_per_byte": round(self.bits_per_byte, 5),
            "tokens": self.tokens,
        }


def score(package: Path, held_out: HeldOut, threads: int | None = None) -> Score:
    """The package's likelihood of the held-out text, teacher-forced."""
    decoder, artifact = open_decoder(package, threads=threads)
    tokenizer = Tokenizer.load(package)
    nll, tokens, size = 0.0, 0, 0
    for ids in tokenizer.encode_batch(held_out.texts):
        ids = ids[: artifact.max_len]
        if len(ids) < 2:
            continue
        logits = np.asarray(decoder.logits(ids[:-1]), dtype=np.float64)  # (T-1, V)
        top = logits.max(axis=-1, keepdims=True)
        log_z = (top + np.log(np.exp(logits - top).sum(axis=-1, keepdims=True)))[:, 0]
        targets = np.asarray(ids[1:])
        nll += float((log_z - logits[np.arange(len(targets)), targets]).sum())
        tokens += len(targets)
        size += len(tokenizer.decode(ids[1:]).encode())
    if tokens == 0:
        raise ValueError(f"{held_out.source}: no sequence of at least 2 tokens to score")
    return Score(nll, tokens, size)


def answers(package: Path, threads: int | None = None) -> list[str]:
    """Greedy answers to the fixed prompt set."""
    decoder, artifact = open_decoder(package, threads=threads)
    tokenizer = Tokenizer.load(package)
    stop = tuple(load(package).tokenizer.stop_ids)
    found = []
    for prompt in PARITY_PROMPTS:
        ids = tokenizer.encode(prompt)[: artifact.max_len - PROMPT_TOKENS]
        out = decoder.greedy(ids, PROMPT_TOKENS, stop_ids=stop)
        found.append(tokenizer.decode(out, skip_special_tokens=True))
    return found


def evaluate(
    candidate: Path,
    baseline: Path | None,
    held_out: HeldOut,
    max_increase: float,
    *,
    labels: tuple[str, str] = ("candidate", "production"),
    threads: int | None = None,
) -> dict:
    """The eval report: the candidate's perplexity on the held-out text (the registry gate's
    `perplexity` and `dataset`), the baseline's on the same text, the comparison against
    `max_increase` (relative), and both versions' answers to the prompt set."""
    mine = score(candidate, held_out, threads)
    report = {
        "dataset": held_out.dataset,
        "held_out": held_out.source,
        **mine.figures(),
        "max_increase": max_increase,
    }
    mine_answers = answers(candidate, threads)
    if baseline is None:
        report["prompts"] = [
            {"prompt": p, labels[0]: a} for p, a in zip(PARITY_PROMPTS, mine_answers, strict=True)
        ]
        return report | {
            "passed": True,
            "detail": f"perplexity {mine.perplexity:.4g} on {held_out.dataset}; "
            f"no {labels[1]} version to compare with",
        }
    theirs = score(baseline, held_out, threads)
    same_tokenizer = _tokenizer_digest(candidate) == _tokenizer_digest(baseline)
    measure = "perplexity" if same_tokenizer else "bits_per_byte"
    a, b = getattr(mine, measure), getattr(theirs, measure)
    increase = a / b - 1
    passed = increase <= max_increase
    report["baseline"] = theirs.figures()
    report["prompts"] = [
        {"prompt": p, labels[0]: x, labels[1]: y}
        for p, x, y in zip(PARITY_PROMPTS, mine_answers, answers(baseline, threads), strict=True)
    ]
    detail = (
        f"{measure} {a:.4g} vs {labels[1]} {b:.4g} ({increase:+.2%}, limit +{max_increase:.2%}) "
        f"on {held_out.dataset}"
    )
    return report | {"compared": measure, "increase": round(increase, 5), "passed": passed,
                     "detail": detail}  # fmt: skip


def _tokenizer_digest(package: Path) -> str | None:
    entries = {f.path: f.sha256 for f in load(package).tokenizer.files}
    return entries.get("tokenizer.json")
