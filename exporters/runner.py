"""The exporter's parity and benchmark harness: plain decode loops over the engine's runner.

`OrtDecoder` is `engine.runner.OrtRunner` (one KV cache allocated once, updated in place through
IO binding) plus `DecodeLoops`, loops that keep batch row r in slot r: prefill, decode, greedy;
`exporters.tensorrt.TrtDecoder` is the same loops over `engine.trt_runner.TrtRunner`.
Parity is therefore measured on the same forward the engine serves with; the engine owns
scheduling, sampling and its own slot bookkeeping.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from engine.runner import OrtRunner
from exporters.graph_builder import read_config


class DecodeLoops:
    """Decode loops over a runner's forward (OrtRunner or engine.trt_runner.TrtRunner), batch
    row r in slot r: what parity (exporters/parity.py's Decoder) and the export benchmark run."""

    max_batch: int  # forward(), reset(), max_len and lengths come from the runner class

    def prefill(self, prompts: Sequence[Sequence[int]]) -> np.ndarray:
        """First prompts of rows 0..len(prompts)-1 in one call → each row's last logits [B, V]."""
        lens = np.array([len(p) for p in prompts])
        if lens.min() < 1 or lens.max() > self.max_len:
            raise ValueError(f"prompt lengths {lens.tolist()} must be in 1..{self.max_len}")
        B, S = len(prompts), int(lens.max())
        ids = np.zeros((B, S), dtype=np.int64)
        for r, p in enumerate(prompts):
            ids[r, : len(p)] = p
        positions = np.broadcast_to(np.arange(S), (B, S))
        last = np.arange(B) * S + lens - 1
        return self.forward(ids, positions, lens - 1, last)

    def decode(self, tokens: Sequence[int]) -> np.ndarray:
        """Appends one token to each of rows 0..len(tokens)-1 → logits [B, V]."""
        B = len(tokens)
        pos = self.lengths[:B].copy()  # the new token's position = tokens already cached
        if pos.max() >= self.max_len:
            raise ValueError(f"a row is full: max_len={self.max_len}")
        ids = np.asarray(tokens, dtype=np.int64)[:, None]
        return self.forward(ids, pos[:, None], pos, np.arange(B))

    def logits(self, prompt_ids: Sequence[int], decode_ids: Sequence[int] = ()) -> np.ndarray:
        """Every prompt position from one prefill, then one decode step per id → (T + D, V):
        the steps the engine runs, for parity against eager PyTorch."""
        T = len(prompt_ids)
        self.reset()
        ids = np.asarray([prompt_ids], dtype=np.int64)
        rows = [self.forward(ids, np.arange(T)[None], np.array([T - 1]), np.arange(T))]
        rows += [self.decode([t]) for t in decode_ids]
        return np.concatenate(rows)

    def greedy(
        self, prompt_ids: list[int], max_tokens: int, stop_ids: Iterable[int] = ()
    ) -> list[int]:
        """Greedy continuation of one prompt (slot 0); stops at a stop id (not returned)."""
        return self.greedy_batch([prompt_ids], max_tokens, stop_ids)[0]

    def greedy_batch(
        self, prompts: list[list[int]], max_tokens: int, stop_ids: Iterable[int] = ()
    ) -> list[list[int]]:
        """Prefills rows of different lengths in one call, then decodes them together."""
        if len(prompts) > self.max_batch:
            raise ValueError(f"{len(prompts)} prompts exceed max_batch={self.max_batch}")
        longest = max(len(p) for p in prompts) + max_tokens
        if longest > self.max_len:
            raise ValueError(f"prompt + max_tokens = {longest} exceeds max_len={self.max_len}")
        stops = set(stop_ids)
        outs: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        logits = self.prefill(prompts)
        for step in range(max_tokens):
            tokens = logits.argmax(-1)
            for r, t in enumerate(tokens.tolist()):
                done[r] = done[r] or t in stops
                if not done[r]:
                    outs[r].append(t)
            if all(done) or step == max_tokens - 1:
                break
            # finished rows keep decoding (their tokens are dropped): the batch stays contiguous
            logits = self.decode(tokens.tolist())
        return outs


class OrtDecoder(DecodeLoops, OrtRunner):
    """Runs either flavour of the engine graph (ORT contrib ops, or the portable one) on ONNX
    Runtime; the cache dtype and capacity come from the graph's past_key_0 input."""

    def __init__(
        self,
        path: str | Path,
        max_batch: int,
        max_len: int,
        threads: int | None = None,
        provider: str = "cpu",
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch} must be >= 1")
        self.cfg, _ = read_config(path)
        OrtRunner.__init__(self, path, max_batch, max_len, threads=threads, provider=provider)
        self.max_batch = max_batch

    def forward(self, *args, **kwargs) -> np.ndarray:
        return OrtRunner.forward(self, *args, **kwargs).copy()  # the loops hold several
