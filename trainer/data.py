"""Tokenize a validated corpus once to disk and serve training blocks from it.

`build_dataset` writes memory-mapped token files that a resumed run reuses; `TokenDataset` serves
blocks in an order that depends only on (seed, position), so a resumed run sees the batches an
uninterrupted one would have. Reading and validating the files is aimass_common/corpus.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import jinja2
import numpy as np
import torch

from aimass_common.corpus import Corpus, DataError, Record, read_records
from aimass_common.files import atomic_write, publish_file
from trainer.model import IGNORE_INDEX
from trainer.tokenizer import Tokenizer

# Documents are encoded in batches of about this many characters: large enough for the
# tokenizers library's parallel encode_batch to pay off, small enough to keep memory flat.
_CHUNK_CHARS = 4 << 20
_Arrays = tuple[np.ndarray, np.ndarray]
_FORMAT = 1  # bump when the layout of the files below changes; older datasets are rebuilt


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """Changes whenever the same text could tokenize or render differently."""
    spec = {
        "tokenizer": tokenizer.tok.to_str(),
        "eos": tokenizer.eos_token,
        "chat_template": tokenizer.chat_template,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def build_dataset(
    corpus: Corpus, tokenizer: Tokenizer, out_dir, block_size: int, val_fraction: float, seed: int
) -> TokenDataset:
    """Tokenizes `corpus` into `out_dir` (or reuses what is there if built from the same inputs).

    Packing: documents are concatenated, each followed by EOS. A chat conversation is rendered with
    the tokenizer's template and its loss mask is 1 exactly on each assistant message's content and
    the end-of-turn text after it; the prompts, other roles and the EOS after it get 0.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    inputs = {
        "format": _FORMAT,
        "corpus_sha256": corpus.sha256,
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "block_size": block_size,
        "val_fraction": val_fraction,
        "seed": seed,
    }
    old = _read_meta(out_dir)
    if (
        old is not None
        and all(old.get(k) == v for k, v in inputs.items())
        and _sizes_ok(out_dir, old)
    ):
        return TokenDataset(out_dir, old)
    if corpus.kind == "chat" and tokenizer.chat_template is None:
        raise DataError(
            corpus.path, "holds chat conversations but the tokenizer has no chat template"
        )

    dtype = np.uint16 if tokenizer.vocab_size <= 65535 else np.uint32
    chat = corpus.kind == "chat"
    # fixed names, not fresh ones: a crashed build's token files are overwritten by the next one
    tmp = {name: out_dir / f"{name}.tmp" for name in ("tokens.bin", "loss_mask.bin")}
    try:
        n_tokens, tokens_sha256, corpus_sha256 = _write_tokens(corpus, tokenizer, dtype, tmp, chat)
        if corpus_sha256 != corpus.sha256:
            raise DataError(corpus.path, "changed since it was scanned; run again")
        train_ids, val_ids = _check_size(corpus.path, n_tokens, block_size, val_fraction, seed)
    except BaseException:
        for p in tmp.values():
            p.unlink(missing_ok=True)
        raise
    meta = {
        **inputs,
        "kind": corpus.kind,
        "dtype": np.dtype(dtype).name,
        "n_tokens": n_tokens,
        "n_documents": corpus.n_documents,
        "n_train_blocks": len(train_ids),
        "n_val_blocks": len(val_ids),
        "tokens_sha256": tokens_sha256,
    }
    # dataset.json goes first and comes back last: a crash in between leaves no metadata that
    # could vouch for half-replaced token files.
    (out_dir / "dataset.json").unlink(missing_ok=True)
    publish_file(tmp["tokens.bin"], out_dir / "tokens.bin")
    if chat:
        publish_file(tmp["loss_mask.bin"], out_dir / "loss_mask.bin")
    else:
        (out_dir / "loss_mask.bin").unlink(missing_ok=True)
    atomic_write(out_dir / "dataset.json", json.dumps(meta, indent=2))
    return TokenDataset(out_dir, meta)


class TokenDataset:
    """Packed tokens on disk, cut into blocks of T = block_size tokens plus one for the shift:

        tokens.bin     t0 t1 t2 ... t(N-1)          block i = tokens[i*T : i*T + T + 1]
        loss_mask.bin  m0 m1 m2 ... m(N-1)  (chat)  x = block[:-1], y = block[1:];
                                                    y[j] = -100 where the target's mask is 0

    Blocks share their edge token (block i's last target is block i+1's first input), so
    n_blocks = (N - 1) // T and no token is dropped as an input.
    """

    def __init__(self, out_dir: Path, meta: dict):
        self.path = Path(out_dir)
        self.meta = meta
        self.kind: str = meta["kind"]
        self.n_tokens: int = meta["n_tokens"]
        self.block_size: int = meta["block_size"]
        self.seed: int = meta["seed"]
        self.tokens_sha256: str = meta["tokens_sha256"]
        dtype = np.dtype(meta["dtype"])
        self.tokens = np.memmap(
            self.path / "tokens.bin", dtype=dtype, mode="r", shape=(self.n_tokens,)
        )
        self.loss_mask = (
            np.memmap(self.path / "loss_mask.bin", dtype=np.uint8, mode="r", shape=(self.n_tokens,))
            if self.kind == "chat"
            else None
        )
        n_blocks = (self.n_tokens - 1) // self.block_size
        self._train_ids, self._val_ids = _split_blocks(n_blocks, meta["val_fraction"], self.seed)
        self.n_train_blocks = len(self._train_ids)
        self.n_val_blocks = len(self._val_ids)
        self._perms: dict[int, np.ndarray] = {}

    @classmethod
    def open(cls, out_dir) -> TokenDataset:
        out_dir = Path(out_dir)
        meta = _read_meta(out_dir)
        if meta is None:
            raise DataError(out_dir, "holds no dataset (dataset.json is missing or unreadable)")
        if not _sizes_ok(out_dir, meta):
            raise DataError(
                out_dir, "token files do not match dataset.json; delete the folder to rebuild"
            )
        return cls(out_dir, meta)

    def train_block_ids(self, position: int, count: int) -> np.ndarray:
        """Elements [position, position+count) of the infinite training stream.

        Element p is perm_e[p % n_train] with e = p // n_train: every epoch visits each training
        block once, in an order seeded by (seed, e) alone, so any chunking gives the same stream.
        """
        p = np.arange(position, position + count, dtype=np.int64)
        epochs, idx = np.divmod(p, self.n_train_blocks)
        out = np.empty(count, dtype=np.int64)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self._epoch_order(int(e))[idx[sel]]
        return out

    def val_block_ids(self) -> np.ndarray:
        return self._val_ids.copy()

    def get_batch(self, block_ids) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y), both (B, T) int64; y is x shifted by one, with -100 on targets outside the loss."""
        offsets = self._offsets(block_ids)  # (B, T+1)
        block = self.tokens[offsets].astype(np.int64)  # (B, T+1)
        x, y = block[:, :-1], block[:, 1:].copy()
        if self.loss_mask is not None:
            y[self.loss_mask[offsets[:, 1:]] == 0] = IGNORE_INDEX
        return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y)

    def count_targets(self, block_ids) -> int:
        """Targets that count in the loss: weights the mean when batches hold different amounts."""
        offsets = self._offsets(block_ids)
        if self.loss_mask is None:
            return offsets.shape[0] * self.block_size
        return int(self.loss_mask[offsets[:, 1:]].sum())

    def _offsets(self, block_ids) -> np.ndarray:
        ids = np.asarray(block_ids, dtype=np.int64).reshape(-1, 1)  # (B, 1)
        return ids * self.block_size + np.arange(self.block_size + 1)  # (B, T+1)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        # a permutation of millions of blocks takes a while; callers walk the stream in order,
        # so the current and the next epoch are all that is worth keeping
        if epoch not in self._perms:
            if len(self._perms) >= 2:
                self._perms.pop(min(self._perms))
            rng = np.random.default_rng([self.seed, epoch])
            self._perms[epoch] = self._train_ids[rng.permutation(self.n_train_blocks)]
        return self._perms[epoch]


# --- tokenizing -------------------------------------------------------------------------------


def _write_tokens(corpus: Corpus, tokenizer: Tokenizer, dtype, tmp: dict[str, Path], chat: bool):
    """Streams the corpus into the temp files; returns (n_tokens, tokens sha256, corpus sha256)."""
    corpus_digest, tokens_digest, n_tokens = hashlib.sha256(), hashlib.sha256(), 0
    with contextlib.ExitStack() as stack:
        ft = stack.enter_context(open(tmp["tokens.bin"], "wb"))
        fm = stack.enter_context(open(tmp["loss_mask.bin"], "wb")) if chat else None
        for ids, mask in _token_chunks(corpus, tokenizer, dtype, corpus_digest):
            data = ids.tobytes()
            ft.write(data)
            tokens_digest.update(data)
            if fm is not None:
                fm.write(mask.tobytes())
            n_tokens += len(ids)
    return n_tokens, tokens_digest.hexdigest(), corpus_digest.hexdigest()


def _token_chunks(corpus: Corpus, tokenizer: Tokenizer, dtype, digest) -> Iterator[_Arrays]:
    """(token ids, loss mask) arrays, a batch of documents at a time."""
    items: list[tuple[str | None, int]] = []  # (text, mask); None stands for EOS
    chars = 0
    for rec in read_records(corpus.files, digest):
        if rec.kind == "text":
            segments = [(rec.payload, 1)] + ([(None, 1)] if rec.end else [])
        else:
            segments = [*_chat_segments(tokenizer, rec.payload, rec), (None, 0)]
        items.extend(segments)
        chars += sum(len(text) for text, _ in segments if text)
        if chars >= _CHUNK_CHARS:
            yield _encode(tokenizer, items, dtype)
            items, chars = [], 0
    if items:
        yield _encode(tokenizer, items, dtype)


def _encode(tokenizer: Tokenizer, items: list[tuple[str | None, int]], dtype) -> _Arrays:
    encoded = iter(tokenizer.encode_batch([text for text, _ in items if text is not None]))
    ids, masks = [], []
    for text, m in items:
        part = [tokenizer.eos_id] if text is None else next(encoded)
        ids.append(np.asarray(part, dtype=dtype))
        masks.append(np.full(len(part), m, dtype=np.uint8))
    return np.concatenate(ids), np.concatenate(masks)


def _chat_segments(
    tokenizer: Tokenizer, messages: list[dict], rec: Record
) -> list[tuple[str, int]]:
    """Cuts the rendered conversation into (text, mask) pieces; mask 1 on the assistant's turns.

    The assistant span of message i is render(messages[:i+1]) minus render(messages[:i],
    add_generation_prompt=True): this needs no knowledge of the template's markup, only that each
    rendering extends the previous one, which is checked.
    """
    segments, prev = [], ""

    def extend(longer: str) -> str:
        if not longer.startswith(prev):
            raise DataError(
                rec.path,
                "the chat template does not render this conversation turn by "
                "turn (a later rendering does not extend the earlier one)",
                line=rec.line,
            )
        return longer[len(prev) :]

    try:
        for i, m in enumerate(messages):
            if m["role"] == "assistant":
                prompt = tokenizer.render_chat(messages[:i], add_generation_prompt=True)
                segments.append((extend(prompt), 0))
                prev = prompt
            rendered = tokenizer.render_chat(messages[: i + 1])
            segments.append((extend(rendered), int(m["role"] == "assistant")))
            prev = rendered
    except jinja2.TemplateError as e:
        raise DataError(
            rec.path, f"the chat template rejected this conversation: {e}", line=rec.line
        ) from None
    return segments


def _check_size(where: Path, n_tokens: int, block_size: int, val_fraction: float, seed: int):
    n_blocks, need = (n_tokens - 1) // block_size, 2 if val_fraction > 0 else 1
    if n_blocks >= need:
        return _split_blocks(n_blocks, val_fraction, seed)
    fit = (n_tokens - 1) // need
    hint = f"use a smaller block_size (--set block_size={fit})" if fit >= 2 else "add more text"
    if n_blocks == 0:
        msg = f", one training block needs block_size+1 = {block_size + 1}"
    else:
        msg = (
            f" make 1 block of block_size={block_size}, and val_fraction={val_fraction} needs 2 "
            "(one to train, one to validate)"
        )
        hint += " or --set val_fraction=0"
    raise DataError(where, f"too little text: {n_tokens} tokens after tokenization{msg}; {hint}")


def _split_blocks(n_blocks: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """By block, seeded: the first share of a permutation validates, the rest trains (both sorted)."""
    perm = np.random.default_rng(seed).permutation(n_blocks)
    # at least one block validates when asked to, and at least one always trains
    n_val = 0 if val_fraction == 0 else min(max(1, round(val_fraction * n_blocks)), n_blocks - 1)
    return np.sort(perm[n_val:]).astype(np.int64), np.sort(perm[:n_val]).astype(np.int64)


def _read_meta(out_dir: Path) -> dict | None:
    try:
        return json.loads((out_dir / "dataset.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _sizes_ok(out_dir: Path, meta: dict) -> bool:
    try:
        expected = {"tokens.bin": meta["n_tokens"] * np.dtype(meta["dtype"]).itemsize}
        if meta["kind"] == "chat":
            expected["loss_mask.bin"] = meta["n_tokens"]
        return all((out_dir / name).stat().st_size == size for name, size in expected.items())
    except (OSError, KeyError, TypeError):
        return False
