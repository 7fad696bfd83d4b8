"""A plain KV-cache decode loop over the ONNX Runtime engine graph (exporters/onnx_ort.py).

The KV cache is allocated once, as one OrtValue per layer and kind of shape
[max_batch, K, max_len, hd], and every step binds each `present_*` output to the same memory as
its `past_*` input, so GroupQueryAttention appends in place and no step copies the cache:

    slot (batch row) 0  [ K × (filled .. | free ........) × hd ]   per layer, keys and values
    slot 1              [ K × (filled ...... | free ....) × hd ]
    ...                   ▲ rows = range(a, a+B) of a forward are bound by pointer, so a step
                            may run any contiguous run of slots

The decoder is the parity and benchmark harness of the exporter, and the reference the engine's
runner is compared with; the engine owns scheduling, sampling and its own slot bookkeeping.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from exporters.onnx_ort import read_config

_DEVICE = {"CPUExecutionProvider": "cpu", "CUDAExecutionProvider": "cuda"}
_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
SCORE_CHUNK = 128  # tokens per scoring call: bounds the [chunk, V] logits held at once


class OrtDecoder:
    """Runs either flavour of the engine graph (ORT contrib ops, or the portable one) on ONNX
    Runtime; the cache dtype and capacity come from the graph's past_key_0 input."""

    def __init__(
        self,
        path: str | Path,
        max_batch: int,
        max_len: int,
        threads: int | None = None,
        provider: str = "CPUExecutionProvider",
    ):
        self.cfg, graph_len = read_config(path)
        if not 1 <= max_len <= graph_len:
            raise ValueError(f"max_len={max_len} must be in 1..{graph_len}, the graph's max_len")
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch} must be >= 1")
        self.max_batch, self.max_len = max_batch, max_len
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), opts, providers=[provider])
        self.device = _DEVICE.get(provider, "cpu")

        cfg = self.cfg
        past = next(i for i in self.session.get_inputs() if i.name == "past_key_0")
        self.kv_dtype = _DTYPES[past.type]
        # a symbolic cache length (ORT flavour) takes max_len; a fixed one (portable) is kept
        capacity = past.shape[2] if isinstance(past.shape[2], int) else max_len
        self._row_shape = (cfg.n_kv_heads, capacity, cfg.head_dim)
        self._row_bytes = int(np.prod(self._row_shape)) * np.dtype(self.kv_dtype).itemsize
        # allocated once and zeroed once: the pages are touched at load rather than in the first
        # decode steps, and a bug that read past a row's length would read zeros, not garbage
        zeros = np.zeros((max_batch, *self._row_shape), dtype=self.kv_dtype)
        self.kv: dict[str, ort.OrtValue] = {}
        for i in range(cfg.n_layers):
            for kind in ("key", "value"):
                value = ort.OrtValue.ortvalue_from_shape_and_type(
                    zeros.shape, self.kv_dtype, self.device, 0
                )
                value.update_inplace(zeros)
                self.kv[f"{kind}_{i}"] = value
        self.binding = self.session.io_binding()
        self._bound_rows: tuple[int, int] | None = None  # (first slot, B) the KV is bound for
        self._logits = np.empty((0, cfg.vocab_size), dtype=np.float32)
        self.lengths = np.zeros(max_batch, dtype=np.int64)  # tokens cached per slot

    def reset(self) -> None:
        """Forgets every slot's tokens. The buffers are not cleared: attention never reads past a
        row's length, and a first prompt (S == total length) starts each row from empty."""
        self.lengths[:] = 0

    def forward(
        self,
        input_ids: np.ndarray,
        positions: np.ndarray,
        seqlens_k: np.ndarray,
        logits_idx: np.ndarray,
        rows: range | None = None,
    ) -> np.ndarray:
        """One graph call: ids/positions [B, S] (right-padded), seqlens_k [B] (each row's total
        length - 1 after the step), logits_idx [N] into the flat B*S axis → logits [N, V].

        `rows` are the cache slots of the B batch rows, a contiguous range (default 0..B-1):
        their buffers are bound by pointer offset, so no slot is copied.
        """
        B, S = input_ids.shape
        rows = range(B) if rows is None else rows
        if len(rows) != B or rows.step != 1 or rows.start < 0 or rows.stop > self.max_batch:
            raise ValueError(
                f"rows={rows} must be a contiguous range of {B} slots in 0..{self.max_batch - 1}"
            )
        seqlens_k = np.ascontiguousarray(seqlens_k, dtype=np.int32)
        total = int(seqlens_k.max()) + 1
        if not S <= total <= self.max_len:
            raise ValueError(f"total length {total} must be in S={S}..max_len={self.max_len}")
        b = self.binding
        b.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, dtype=np.int64))
        b.bind_cpu_input("position_ids", np.ascontiguousarray(positions, dtype=np.int64))
        b.bind_cpu_input("seqlens_k", seqlens_k)
        b.bind_cpu_input("total_sequence_length", np.array(total, dtype=np.int32))
        b.bind_cpu_input("logits_idx", np.ascontiguousarray(logits_idx, dtype=np.int64))
        if (rows.start, B) != self._bound_rows:  # rebinding 2L buffers costs ~5% of a step
            shape = (B, *self._row_shape)
            offset = rows.start * self._row_bytes
            for name, value in self.kv.items():
                ptr = value.data_ptr() + offset
                b.bind_input(f"past_{name}", self.device, 0, self.kv_dtype, shape, ptr)
                b.bind_output(f"present_{name}", self.device, 0, self.kv_dtype, shape, ptr)
            self._bound_rows = (rows.start, B)
        N = len(logits_idx)
        if self._logits.shape[0] != N:  # a preallocated output: no allocation per decode step
            self._logits = np.empty((N, self.cfg.vocab_size), dtype=np.float32)
            b.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(self._logits))
        self.session.run_with_iobinding(b)
        self.lengths[rows.start : rows.stop] = seqlens_k + 1
        return self._logits.copy()

    # ── convenience loops (batch row r lives in slot r) ──

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

    def score(self, token_ids: Sequence[int]) -> np.ndarray:
        """log p(token_t | tokens_<t) for t = 1..n-1, as float64 [n-1]; sum for log-likelihood.

        Runs in slot 0 as chunked prefill of SCORE_CHUNK tokens. A sequence longer than max_len
        is scored in windows of max_len tokens that overlap by one (the window's first token is
        context only), so each token sees at most max_len - 1 tokens of context.
        """
        if self.max_len < 2:
            raise ValueError(f"scoring needs max_len >= 2, not {self.max_len}")
        ids = np.asarray(token_ids, dtype=np.int64)
        out = np.empty(max(len(ids) - 1, 0), dtype=np.float64)
        start = 0
        while start < len(ids) - 1:
            window = ids[start : start + self.max_len]
            out[start : start + len(window) - 1] = self._score_window(window)
            start += len(window) - 1
        return out

    def _score_window(self, ids: np.ndarray) -> np.ndarray:
        logprobs = []
        for c in range(0, len(ids) - 1, SCORE_CHUNK):
            chunk = ids[c : min(c + SCORE_CHUNK, len(ids) - 1)]  # the last token predicts nothing
            n = len(chunk)
            positions = np.arange(c, c + n)[None]
            logits = self.forward(chunk[None], positions, np.array([c + n - 1]), np.arange(n))
            logits = logits.astype(np.float64)
            m = logits.max(-1, keepdims=True)
            lse = m[:, 0] + np.log(np.exp(logits - m).sum(-1))
            targets = ids[c + 1 : c + n + 1]
            logprobs.append(logits[np.arange(n), targets] - lse)
        return np.concatenate(logprobs)
