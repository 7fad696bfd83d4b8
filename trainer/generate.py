"""Eager PyTorch sampling from a checkpoint: the reference every compiled engine is compared to.

Greedy when temperature is 0; otherwise temperature, top-k and top-p with a seeded generator.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from trainer.errors import ConfigError
from trainer.model import KVCache, Transformer


@torch.no_grad()
def stream_tokens(
    model: Transformer,
    prompt_ids: list[int],
    max_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop_ids: Iterable[int] = (),
) -> Iterator[int]:
    """Yields new token ids one at a time; stops after max_tokens or at a stop id (not yielded)."""
    cfg = model.cfg
    if not prompt_ids:
        raise ConfigError("prompt is empty: it must hold at least one token")
    if len(prompt_ids) + max_tokens > cfg.max_seq_len:
        raise ConfigError(
            f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) = "
            f"{len(prompt_ids) + max_tokens} exceeds the model's context of {cfg.max_seq_len}"
        )
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ConfigError(
            f"temperature={temperature} must be >= 0, top_p={top_p} in (0, 1], top_k={top_k} >= 0"
        )
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()  # this generator only, from the OS: torch's global RNG is left as it was
    else:
        gen.manual_seed(seed)
    stops = set(stop_ids)
    cache = KVCache(cfg, 1, len(prompt_ids) + max_tokens, device, dtype)
    idx = torch.tensor([prompt_ids], device=device)
    for _ in range(max_tokens):
        logits = model(idx, cache=cache, last_only=True)[0, -1].float()  # (V,)
        token = sample_token(logits, temperature, top_k, top_p, gen)
        if token in stops:
            return
        yield token
        idx = torch.tensor([[token]], device=device)


def generate(model: Transformer, prompt_ids: list[int], max_tokens: int, **sampling) -> list[int]:
    return list(stream_tokens(model, prompt_ids, max_tokens, **sampling))


def sample_token(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float, gen: torch.Generator
) -> int:
    """One token from (V,) logits: argmax at temperature 0, else temperature → top-k → top-p."""
    if temperature == 0:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # drop a token when the tokens ranked above it already reach top_p; the top one always stays
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=gen))


class TextStream:
    """Incremental detokenization that never emits half a UTF-8 character: text is released only
    once the decoded tail is no longer an incomplete byte sequence (U+FFFD at the end)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        new, self.emitted = text[self.emitted :], len(text)
        return new

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids)
        new, self.emitted = text[self.emitted :], len(text)
        return new
