"""The corpus pipeline: validate the files, tokenize them once to disk, serve training blocks.

Inputs: a .txt/.md file (one document), a .jsonl file of `{"text": ...}` lines or of
`{"messages": [{"role", "content"}, ...]}` lines (chat: loss on the assistant's turns only), or a
folder of these. `scan_corpus` reads everything before training, so a bad line fails in seconds,
not hours into a run; `build_dataset` tokenizes once into memory-mapped files a resumed run
reuses; `TokenDataset` serves blocks in an order that depends only on (seed, position), so a
resumed run sees the batches an uninterrupted one would have.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import jinja2
import numpy as np
import torch

from trainer.errors import DataError
from trainer.tokenizer import Tokenizer

TEXT_SUFFIXES = (".txt", ".md")
SUFFIXES = (*TEXT_SUFFIXES, ".jsonl")
ROLES = ("system", "user", "assistant")
IGNORE_INDEX = -100  # target value that torch's cross_entropy skips

# Signatures of files people drop into a corpus folder by mistake. UTF-16 is named apart because
# it is text, just in an encoding we do not read, and the fix differs.
_SIGNATURES = {
    b"\xff\xfe": "UTF-16 text; save it as UTF-8",
    b"\xfe\xff": "UTF-16 text; save it as UTF-8",
    b"%PDF-": "a PDF",
    b"PK\x03\x04": "a zip archive (or .docx/.xlsx)",
    b"\x1f\x8b": "gzip-compressed",
    b"\x89PNG": "a PNG image",
    b"\xff\xd8\xff": "a JPEG image",
    b"GIF8": "a GIF image",
    b"\x7fELF": "an executable",
}
_BOM = b"\xef\xbb\xbf"
# Long documents are read and tokenized in pieces cut at line ends: memory stays bounded, and the
# tokenizers library's encode time grows faster than the input's length (measured on 2 cores:
# 8 KiB pieces encode 1.6x faster than 32 KiB ones, 3x faster than whole 580 KB files; 2 KiB gains
# nothing more). A cut only changes how a run of blank lines across it is merged.
_PIECE_CHARS = 8 << 10
# Documents are encoded in batches of about this many characters: large enough for the
# tokenizers library's parallel encode_batch to pay off, small enough to keep memory flat.
_CHUNK_CHARS = 4 << 20
_Arrays = tuple[np.ndarray, np.ndarray]
_FORMAT = 1  # bump when the layout of the files below changes; older datasets are rebuilt


@dataclass(frozen=True)
class Corpus:
    path: Path  # what the user gave: a file or a folder
    files: list[Path]  # the files read, in sorted path order
    kind: str  # "text", or "chat" if any file holds conversations
    n_documents: int  # text files, text records and conversations that hold any text
    n_bytes: int  # size of the files on disk
    sha256: str  # of the files' contents in order; names do not count, so moving a corpus keeps it


class _Record(NamedTuple):
    path: Path  # the file it comes from
    kind: str  # "text" or "chat"
    payload: str | list[dict]  # a piece of text, or the validated messages
    line: int  # 1-based line of the record in a .jsonl file; 1 for text files
    end: bool  # the document ends here (text files come in several pieces)


def scan_corpus(path) -> Corpus:
    """Validates the whole corpus, raising DataError with the file and line of the first problem."""
    root = Path(path)
    if not root.exists():
        raise DataError(root, "does not exist")
    if root.is_dir():
        # sorted by path components, which no Python version or OS reorders
        parts = sorted(
            p.relative_to(root).parts
            for p in root.rglob("*")
            if p.is_file()
            and p.suffix.lower() in SUFFIXES
            and not any(part.startswith(".") for part in p.relative_to(root).parts)
        )
        files = [root.joinpath(*p) for p in parts]
        if not files:
            raise DataError(
                root, f"no {', '.join(SUFFIXES)} files in this folder (hidden ones are skipped)"
            )
    elif root.suffix.lower() not in SUFFIXES:
        raise DataError(
            root,
            f"unsupported file extension {root.suffix!r}; "
            f"use {', '.join(SUFFIXES)} or a folder of them",
        )
    else:
        files = [root]
    digest = hashlib.sha256()
    n_documents, chat = 0, False
    for record in _corpus_records(files, digest):
        n_documents += record.end
        chat = chat or record.kind == "chat"
    if n_documents == 0:
        raise DataError(
            root, "the corpus is empty: its files hold no text (only whitespace or nothing)"
        )
    return Corpus(
        path=root,
        files=files,
        kind="chat" if chat else "text",
        n_documents=n_documents,
        n_bytes=sum(p.stat().st_size for p in files),
        sha256=digest.hexdigest(),
    )


def iter_texts(corpus: Corpus) -> Iterator[str]:
    """The raw texts to train a tokenizer on: text documents and the contents of chat messages."""
    for record in _corpus_records(corpus.files, hashlib.sha256()):
        if record.kind == "text":
            yield record.payload
        else:
            yield from (m["content"] for m in record.payload if m["content"])


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
    tmp = {
        name: out_dir / f"{name}.tmp" for name in ("tokens.bin", "loss_mask.bin", "dataset.json")
    }
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
    os.replace(tmp["tokens.bin"], out_dir / "tokens.bin")
    if chat:
        os.replace(tmp["loss_mask.bin"], out_dir / "loss_mask.bin")
    else:
        (out_dir / "loss_mask.bin").unlink(missing_ok=True)
    tmp["dataset.json"].write_text(json.dumps(meta, indent=2))
    os.replace(tmp["dataset.json"], out_dir / "dataset.json")
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


# --- reading and validating files ---------------------------------------------------------------


def _corpus_records(files: list[Path], digest) -> Iterator[_Record]:
    for path in files:
        file_digest = hashlib.sha256()
        yield from _records(path, file_digest)
        digest.update(file_digest.digest())


def _records(path: Path, digest) -> Iterator[_Record]:
    with open(path, "rb") as f:
        head = f.read(8)
        for magic, what in _SIGNATURES.items():
            if head.startswith(magic):
                raise DataError(path, f"binary file: this looks like {what}")
        f.seek(0)
        lines = _decoded_lines(path, f, digest)
        if path.suffix.lower() == ".jsonl":
            yield from _jsonl_records(path, lines)
        else:
            yield from _text_records(path, (text for _, text in lines))


def _decoded_lines(path: Path, f, digest) -> Iterator[tuple[int, str]]:
    for n, raw in enumerate(f, 1):
        digest.update(raw)
        if b"\0" in raw:
            raise DataError(path, "binary file: it contains NUL bytes", line=n)
        if n == 1 and raw.startswith(_BOM):
            raw = raw[len(_BOM) :]
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(
                path,
                f"not valid UTF-8: byte 0x{raw[e.start]:02x} at column {e.start + 1}; "
                "save the file as UTF-8",
                line=n,
            ) from None
        yield n, line


def _text_records(path: Path, lines: Iterable[str], line: int = 1) -> Iterator[_Record]:
    """One document in pieces of about _PIECE_CHARS cut at line ends; nothing if only whitespace."""
    buf: list[str] = []
    size, started = 0, False
    for text in lines:
        buf.append(text)
        size += len(text)
        if size >= _PIECE_CHARS:
            piece = "".join(buf)
            if started or piece.strip():
                started = True
                yield _Record(path, "text", piece, line, False)
            buf, size = [], 0
    piece = "".join(buf)
    if started or piece.strip():
        yield _Record(path, "text", piece, line, True)


def _jsonl_records(path: Path, lines: Iterable[tuple[int, str]]) -> Iterator[_Record]:
    file_kind, first = None, 0
    for n, line in lines:
        if not line.strip():
            continue
        try:
            kind, payload = _parse_record(line, file_kind)
            if file_kind is None:
                file_kind, first = kind, n
            elif kind != file_kind:
                raise _Invalid(
                    f"this line is a {kind} record but line {first} is a {file_kind} record; "
                    "one .jsonl file holds one kind, put them in separate files"
                )
        except _Invalid as e:
            raise DataError(path, str(e), line=n) from None
        if kind == "chat":
            yield _Record(path, kind, payload, n, True)
        else:
            yield from _text_records(path, payload.splitlines(keepends=True), line=n)


class _Invalid(ValueError):
    """A JSON line is unusable; the caller adds the file and line."""


def _parse_record(line: str, file_kind: str | None) -> tuple[str, str | list[dict]]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise _Invalid(f"malformed JSON: {e.msg} at column {e.colno}") from None
    if not isinstance(obj, dict):
        raise _Invalid(f"each line must be a JSON object, this one is {_json_type(obj)}")
    if "text" in obj and "messages" in obj:
        raise _Invalid('has both "text" and "messages"; a line is one or the other')
    if "text" in obj:
        if not isinstance(obj["text"], str):
            raise _Invalid(f'"text" must be a string, not {_json_type(obj["text"])}')
        return "text", obj["text"]
    if "messages" in obj:
        return "chat", _checked_messages(obj["messages"])
    expected = {"text": '"text"', "chat": '"messages"'}.get(
        file_kind, '"text" (pretraining) or "messages" (chat)'
    )
    raise _Invalid(f"missing field {expected}")


def _checked_messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise _Invalid(f'"messages" must be a non-empty list, not {_json_type(messages)}')
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _Invalid(f"messages[{i}] must be an object, not {_json_type(m)}")
        for key in ("role", "content"):
            if not isinstance(m.get(key), str):
                raise _Invalid(
                    f'messages[{i}] needs a string "{key}", got {_json_type(m.get(key))}'
                )
        if m["role"] not in ROLES:
            raise _Invalid(
                f"messages[{i}] has unknown role {m['role']!r}; use one of {', '.join(ROLES)}"
            )
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise _Invalid("conversation has no assistant message, so nothing to learn from")
    return out


def _json_type(value) -> str:
    names = {
        dict: "an object",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        type(None): "null",
    }
    if isinstance(value, list) and not value:
        return "an empty list"
    return names.get(type(value), type(value).__name__)


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
    for rec in _corpus_records(corpus.files, digest):
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
    tokenizer: Tokenizer, messages: list[dict], rec: _Record
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
