"""Speculative decoding without a second model: prompt-lookup (n-gram) drafts, verified in one
forward.

A decoding request whose last n tokens (n = 3, then 2, then 1) occurred earlier in its prompt +
output proposes the k tokens that followed that occurrence (Saxena 2023, "prompt lookup
decoding"; llama.cpp's `ngram` speculative mode). Its step then carries 1 + k tokens at
positions len-1 .. len-1+k with logits for all of them:

    input   [ t_last | d_0 | d_1 | ... | d_k-1 ]       one batch-1 forward on the request's past
    logits    ▼        ▼     ▼           ▼
    target    y_0      y_1   y_2   ...   y_k           each sampled as a plain decode would be
    emitted   y_0 .. y_a where a = the first j with y_j != d_j (or k): a accepted drafts + 1

Verification draws each y_j exactly as decoding one token at a time would (same logits, same
penalties over the history up to it, the same uniform from the request's generator), and stops
at the first y_j that differs from d_j. For a deterministic draft (q one-hot on d_j) that *is*
the standard rejection rule (Leviathan et al. 2023; Chen et al. 2023): d_j is accepted with
probability p(d_j) = min(1, p(d_j) / q(d_j)), and on rejection y_j is distributed as p
restricted to tokens other than d_j, renormalised, which is (p − q)+ normalised. Drawing it this
way also keeps a seeded request's tokens identical with speculation on and off, and the number of
draws equal to the number of tokens emitted. Rejected positions stay in the cache past the
request's length and are overwritten by later steps.

When it is off (the rule `Speculator.drafts` applies each step):
- more than `max_batch` requests decoding: ONNX Runtime's CPU GroupQueryAttention runs several
  tokens on a past only at batch 1, so each speculating request costs a forward of its own,
  while a plain decode of B rows shares one weight stream (on a CPU, a batch-1 forward is
  memory-bound: a row costs a fraction of the forward). Past a couple of rows the batched
  decode wins whatever the acceptance;
- a request whose drafts were mostly rejected: over its last WINDOW drafted tokens, an
  acceptance below MIN_ACCEPTANCE pauses its drafts for PAUSE_STEPS decode steps (a draft
  costs the verify forward's extra positions even when all are rejected).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from engine.request import RequestState

NGRAM_MAX, NGRAM_MIN = 3, 1  # the suffix lengths looked up, longest first
# Each speculating request costs a batch-1 forward (see the module doc); above this many
# decoding requests a plain batched decode is cheaper (benchmarks/engine_speculative.py)
SPEC_MAX_BATCH = 1
WINDOW = 16  # drafted tokens a request's acceptance is judged over
# A verify forward of 1 + 4 positions cost ~1.65x a one-token decode at batch 1 (SmolLM2-135M
# int4, 2 cores, benchmarks/engine_speculative.py): a draft of 4 pays once ~0.65 of its tokens
# are accepted, 16%; below 20% it does not
MIN_ACCEPTANCE = 0.2
PAUSE_STEPS = 32  # decode steps a request with a low acceptance goes without drafts


class NgramIndex:
    """A sequence and, for each 1..NGRAM_MAX-gram in it, where its latest occurrence ended."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self._end: dict[tuple[int, ...], int] = {}  # n-gram → end (exclusive) of its latest
        self._indexed = 0  # n-grams ending at or before this are in _end

    def extend(self, tokens: Sequence[int]) -> None:
        self.tokens.extend(tokens)

    def propose(self, k: int) -> tuple[int, ...]:
        """Up to k tokens that followed the latest earlier occurrence of the sequence's last n
        tokens, n = NGRAM_MAX down to NGRAM_MIN; () when none occurred."""
        t, end = self.tokens, len(self.tokens)
        # index every n-gram that ends before the last token: the suffix itself must not match
        for e in range(self._indexed + 1, end):
            for n in range(NGRAM_MIN, min(NGRAM_MAX, e) + 1):
                self._end[tuple(t[e - n : e])] = e
        self._indexed = max(self._indexed, end - 1)
        for n in range(min(NGRAM_MAX, end - 1), NGRAM_MIN - 1, -1):
            e = self._end.get(tuple(t[end - n :]))
            if e is not None:
                return tuple(t[e : e + k])
        return ()


@dataclass(slots=True)
class _Track:
    index: NgramIndex
    window: deque[tuple[int, int]] = field(default_factory=deque)  # (drafted, accepted)
    drafted: int = 0  # sums over window
    accepted: int = 0
    paused: int = 0  # decode steps left without drafts


class Speculator:
    """Which decoding requests carry drafts this step, and what their acceptance has been.
    Plain data: the scheduler asks it each step and tells it what was accepted."""

    def __init__(self, k: int, max_batch: int = SPEC_MAX_BATCH):
        if k < 1:
            raise ValueError(f"Speculator.k = {k} must be >= 1 (draft tokens per step)")
        self.k, self.max_batch = k, max_batch
        self._tracks: dict[str, _Track] = {}
        self.drafted_total = self.accepted_total = 0

    def drafts(self, decoding: Sequence[RequestState], budget: int) -> dict[str, tuple[int, ...]]:
        """{request id: draft} for this step's decoding requests, within `budget` tokens past
        their one decode token each; {} when speculation does not pay (the module doc)."""
        if len(decoding) > self.max_batch:
            return {}
        out: dict[str, tuple[int, ...]] = {}
        for state in decoding:
            # the emitted tokens (accepted + 1) must stay within max_tokens
            room = min(self.k, budget, state.request.max_tokens - len(state.output_token_ids) - 1)
            if room < 1:
                continue
            track = self._track(state)
            if track.paused:
                track.paused -= 1
                continue
            draft = track.index.propose(room)
            if draft:
                out[state.request_id] = draft
                budget -= len(draft)
        return out

    def verified(self, request_id: str, drafted: int, accepted: int) -> None:
        """A request's draft of `drafted` tokens had its first `accepted` accepted."""
        self.drafted_total += drafted
        self.accepted_total += accepted
        track = self._tracks[request_id]
        track.window.append((drafted, accepted))
        track.drafted += drafted
        track.accepted += accepted
        while track.drafted - track.window[0][0] >= WINDOW:
            d, a = track.window.popleft()
            track.drafted -= d
            track.accepted -= a
        if track.drafted >= WINDOW and track.accepted < MIN_ACCEPTANCE * track.drafted:
            track.paused = PAUSE_STEPS
            track.window.clear()
            track.drafted = track.accepted = 0

    def forget(self, request_id: str) -> None:
        self._tracks.pop(request_id, None)

    @property
    def acceptance(self) -> float:
        """Accepted / drafted tokens since start (0 before any draft)."""
        return self.accepted_total / self.drafted_total if self.drafted_total else 0.0

    def _track(self, state: RequestState) -> _Track:
        track = self._tracks.get(state.request_id)
        if track is None:
            track = self._tracks[state.request_id] = _Track(NgramIndex())
            track.index.extend(state.request.prompt_token_ids)
        index = track.index
        known = len(index.tokens) - state.num_prompt_tokens
        index.extend(state.output_token_ids[known:])
        return track


def accepted_prefix(targets: Sequence[int], draft: Sequence[int]) -> int:
    """How many leading draft tokens the targets (one per verified position, len(draft) + 1)
    agree with; the tokens emitted are targets[: that + 1]."""
    for j, d in enumerate(draft):
        if targets[j] != d:
            return j
    return len(draft)
