"""Next-token sampling for the whole batch at once, with numpy only (the engine imports no torch).

Order of operations per row, as in vLLM and the OpenAI API:

1. repetition penalty (CTRL, Keskar et al. 2019) over every token seen, prompt *and* output: a
   seen token's positive logit is divided by the penalty and a negative one multiplied, so a
   penalty above 1 always makes it less likely;
2. presence and frequency penalties (OpenAI) over the *output* only: subtract
   presence × 1[count > 0] + frequency × count. The prompt is the user's text; penalising its
   words would push the answer off topic (vLLM counts the output only too);
3. temperature 0 → argmax of the penalised logits; otherwise temperature → top-k → top-p →
   min-p → one draw from the row's own generator.

Logprobs are the raw model's: the log-softmax of the logits as given, before penalties and
temperature (vLLM's default), so they score a token under the model, not under the settings.

Batch invariance: every sampled row takes exactly one uniform from its own request's generator
per step, and every array op works row by row, so a seeded request samples the same tokens alone
or batched with any others. Greedy rows take no draw.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from engine.request import SamplingParams


@dataclass(frozen=True, slots=True)
class SampleResult:
    tokens: np.ndarray  # (B,) int64: the chosen token of each row
    # (B,) float32: the raw model's logprob of each chosen token, for rows whose params ask for
    # logprobs (0 elsewhere: computing it costs a softmax over the vocabulary)
    logprobs: np.ndarray
    # per row: (ids, logprobs) of the `params.logprobs` most likely tokens under the raw model,
    # most likely first; None where the row asked for none
    top_logprobs: list[tuple[np.ndarray, np.ndarray] | None]


def make_generator(seed: int | None, choice: int = 0) -> np.random.Generator:
    """The generator the engine keeps for one choice of one request, for the request's whole life.

    A seed makes the request reproducible; `choice` keeps the n > 1 choices of one seeded request
    apart. No seed: fresh OS entropy."""
    if seed is None:
        return np.random.default_rng()
    return np.random.default_rng([seed % 2**64, choice])  # SeedSequence takes no negatives


class Sampler:
    """Stateless: everything per request arrives with each call (the engine owns the generators)."""

    def sample(
        self,
        logits: np.ndarray,  # (B, V) float32, the last position's logits of each row
        params: Sequence[SamplingParams],
        histories: Sequence[Sequence[int]],  # prompt + output token ids of each row
        prompt_lens: Sequence[int],  # where the output starts in each history
        generators: Sequence[np.random.Generator],
    ) -> SampleResult:
        B, V = logits.shape
        if not len(params) == len(histories) == len(prompt_lens) == len(generators) == B:
            raise ValueError(
                f"{B} rows of logits but {len(params)} params, {len(histories)} histories, "
                f"{len(prompt_lens)} prompt_lens, {len(generators)} generators"
            )
        if all(_plain_greedy(p) for p in params):  # the common serving case: one argmax
            return SampleResult(logits.argmax(axis=1), np.zeros(B, np.float32), [None] * B)
        logits = np.asarray(logits, np.float32)
        x = apply_penalties(logits, params, histories, prompt_lens)
        temps = np.array([p.temperature for p in params], np.float32)
        drawn = np.flatnonzero(temps != 0)
        if drawn.size == 0:  # all greedy (the common serving case): no copy of the logits
            tokens = x.argmax(axis=1)
        else:
            tokens = np.empty(B, np.int64)
            greedy = np.flatnonzero(temps == 0)
            if greedy.size:
                tokens[greedy] = x[greedy].argmax(axis=1)
            tokens[drawn] = _sample_rows(
                x[drawn] / temps[drawn, None],
                [params[i] for i in drawn],
                [generators[i] for i in drawn],
            )

        # the raw model's log-softmax, for the rows that asked for logprobs only: one exp pass
        # over a 49k vocabulary costs ~0.1 ms a row, more than the rest of the sampler
        chosen = np.zeros(B, np.float32)
        top: list[tuple[np.ndarray, np.ndarray] | None] = [None] * B
        wanted = [i for i, p in enumerate(params) if p.logprobs is not None]
        if wanted:
            rows = logits[wanted]
            peak = rows.max(axis=1, keepdims=True)
            lse = (peak + np.log(np.exp(rows - peak).sum(axis=1, keepdims=True)))[:, 0]
            for j, i in enumerate(wanted):
                chosen[i] = rows[j, tokens[i]] - lse[j]
                if params[i].logprobs:
                    top[i] = _top_n(rows[j], lse[j], params[i].logprobs)
        return SampleResult(tokens, chosen, top)


def _plain_greedy(p: SamplingParams) -> bool:
    return (
        p.temperature == 0
        and p.logprobs is None
        and p.repetition_penalty == 1
        and not p.presence_penalty
        and not p.frequency_penalty
    )


def apply_penalties(
    logits: np.ndarray,
    params: Sequence[SamplingParams],
    histories: Sequence[Sequence[int]],
    prompt_lens: Sequence[int],
) -> np.ndarray:
    """(B, V) logits after the repetition, presence and frequency penalties; the input itself
    when no row has any (the common case costs nothing)."""
    if all(
        p.repetition_penalty == 1 and not p.presence_penalty and not p.frequency_penalty
        for p in params
    ):
        return logits  # the common case: no arrays built
    rep = np.array([p.repetition_penalty for p in params], np.float32)
    pres = np.array([p.presence_penalty for p in params], np.float32)
    freq = np.array([p.frequency_penalty for p in params], np.float32)
    rep_rows = np.flatnonzero(rep != 1)
    out_rows = np.flatnonzero((pres != 0) | (freq != 0))
    if not rep_rows.size and not out_rows.size:
        return logits
    x = logits.copy()
    V = x.shape[1]
    if rep_rows.size:
        r, t = _flatten(histories, rep_rows, [0] * len(histories))
        seen = np.zeros((rep_rows.size, V), bool)
        seen[r, t] = True
        sub, pen = x[rep_rows], rep[rep_rows, None]
        x[rep_rows] = np.where(seen, np.where(sub > 0, sub / pen, sub * pen), sub)
    if out_rows.size:
        r, t = _flatten(histories, out_rows, prompt_lens)
        counts = np.bincount(r * V + t, minlength=out_rows.size * V).reshape(-1, V)
        x[out_rows] -= pres[out_rows, None] * (counts > 0) + freq[out_rows, None] * counts
    return x


def _flatten(histories, rows: np.ndarray, starts) -> tuple[np.ndarray, np.ndarray]:
    """(index into `rows`, token id) for every token of each row's history from its start: one
    flat pair of arrays, so the counting is a single scatter rather than a loop per token."""
    parts = [np.asarray(histories[i][starts[i] :], np.int64) for i in rows]
    lens = [len(p) for p in parts]
    tokens = np.concatenate(parts) if parts else np.empty(0, np.int64)
    return np.repeat(np.arange(len(rows)), lens), tokens


# Rank filters look at the top of the ranking only: argpartition finds these candidates in O(V)
# where a full sort costs V log V per row (~3 ms against ~100 ms for 32 rows of a 49k vocabulary).
# A row whose top-k or nucleus reaches past them (a near-flat distribution) falls back to the sort.
_CANDIDATES = 1024


def _sample_rows(x: np.ndarray, params: list[SamplingParams], gens: list) -> np.ndarray:
    """One token per row of temperature-scaled logits (n, V): top-k → top-p → min-p → draw."""
    n, V = x.shape
    # one uniform per row, drawn in row order before the rows split by filter: the rows of a
    # verified draft share one generator and must draw as consecutive decodes would
    u = np.array([g.random() for g in gens])
    top_k = np.array([p.top_k for p in params])
    top_p = np.array([p.top_p for p in params], np.float32)
    min_p = np.array([p.min_p for p in params], np.float32)
    e = np.exp(x - x.max(axis=1, keepdims=True))
    total = e.sum(axis=1, keepdims=True)  # softmax denominators over the whole vocabulary
    out = np.empty(n, np.int64)

    plain = np.flatnonzero((top_k == 0) & (top_p >= 1))
    if plain.size:
        probs = e[plain] / total[plain]
        probs[probs < min_p[plain, None] * probs.max(axis=1, keepdims=True)] = 0.0
        out[plain] = _draw(probs, u[plain])

    ranked = np.flatnonzero((top_k > 0) | (top_p < 1))
    if not ranked.size:
        return out
    K = min(V, _CANDIDATES)
    cand = np.argpartition(-x[ranked], K - 1, axis=1)[:, :K]
    mass = np.take_along_axis(e[ranked], cand, axis=1).sum(axis=1) / total[ranked, 0]
    # a row fits in its candidates when its top-k or its nucleus lies inside them; decided by
    # the row alone, so whether a row takes the full sort never depends on its batch
    k = top_k[ranked]
    fits = np.where(k > 0, k <= K, mass >= top_p[ranked])
    full = np.broadcast_to(np.arange(V), (int((~fits).sum()), V))
    for sub, ids in ((ranked[fits], cand[fits]), (ranked[~fits], full)):
        if not sub.size:
            continue
        # stable: ties rank the same in any batch
        ids = np.take_along_axis(
            ids, np.argsort(-np.take_along_axis(x[sub], ids, axis=1), axis=1, kind="stable"), axis=1
        )
        probs = np.take_along_axis(e[sub], ids, axis=1) / total[sub]  # ranked, most likely first
        kk = top_k[sub, None]
        probs[(kk > 0) & (np.arange(ids.shape[1]) >= kk)] = 0.0
        # top-p measures the top-k survivors renormalised, as the reference's softmax after top-k
        probs /= np.where(kk > 0, probs.sum(axis=1, keepdims=True), 1.0)
        # drop a token once the tokens ranked above it reach top_p: the top one always stays;
        # rows with top_p = 1 are exempt, or rounding in the cumsum would clip their tail
        tp = top_p[sub, None]
        probs[(tp < 1) & (np.cumsum(probs, axis=1) - probs >= tp)] = 0.0
        probs[probs < min_p[sub, None] * probs[:, :1]] = 0.0
        idx = _draw(probs, u[sub])
        out[sub] = np.take_along_axis(ids, idx[:, None], axis=1)[:, 0]
    return out


def _draw(probs: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Inverse-CDF draw from unnormalised (n, V) probabilities, one uniform `u` per row."""
    cdf = np.cumsum(probs, axis=1, dtype=np.float64)
    # the first index whose cdf exceeds u × total: never a zero-probability token
    idx = (cdf <= (u * cdf[:, -1])[:, None]).sum(axis=1)
    # u × total can round up to the total itself (about once in 2^50 draws): take the top token
    return np.where(idx < probs.shape[1], idx, probs.argmax(axis=1))


def _top_n(row: np.ndarray, lse: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    n = min(n, row.size)
    ids = np.argpartition(-row, n - 1)[:n]  # O(V), not a full sort
    ids = ids[np.argsort(-row[ids], kind="stable")]
    return ids, row[ids] - lse
