"""Reading a corpus and checking all of it before anything is trained (or uploaded).

Torch-free, so the gateway validates an uploaded training file with exactly the code the trainer
reads it with (the trainer and the control plane both import it from here).

Inputs: a .txt/.md file (one document), a .jsonl file of `{"text": ...}` lines or of
`{"messages": [{"role", "content"}, ...]}` lines (chat: loss on the assistant's turns only), or a
folder of these. `scan_corpus` reads everything before training, so a bad line fails in seconds,
not hours into a run; `build_dataset` tokenizes once into memory-mapped files a resumed run
reuses; `TokenDataset` serves blocks in an order that depends only on (seed, position), so a
resumed run sees the batches an uninterrupted one would have.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

TEXT_SUFFIXES = (".txt", ".md")
SUFFIXES = (*TEXT_SUFFIXES, ".jsonl")
ROLES = ("system", "user", "assistant")

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


@dataclass(frozen=True)
class Corpus:
    path: Path  # what the user gave: a file or a folder
    files: list[Path]  # the files read, in sorted path order
    kind: str  # "text", or "chat" if any file holds conversations
    n_documents: int  # text files, text records and conversations that hold any text
    n_bytes: int  # size of the files on disk
    sha256: str  # of the files' contents in order; names do not count, so moving a corpus keeps it


class DataError(Exception):
    """The corpus cannot be used. Carries the file and, where there is one, the 1-based line.

    The trainer's data pipeline raises it too (trainer.errors re-exports it)."""

    def __init__(self, path, message: str, line: int | None = None):
        self.path = str(path)
        self.line = line
        self.reason = message  # without the file and line, for callers that name the file
        where = self.path if line is None else f"{self.path}:{line}"
        super().__init__(f"{where}: {message}")


class Record(NamedTuple):
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
    for record in read_records(files, digest):
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
    for record in read_records(corpus.files, hashlib.sha256()):
        if record.kind == "text":
            yield record.payload
        else:
            yield from (m["content"] for m in record.payload if m["content"])


# --- reading and validating files ---------------------------------------------------------------


def read_records(files: list[Path], digest) -> Iterator[Record]:
    for path in files:
        file_digest = hashlib.sha256()
        yield from _records(path, file_digest)
        digest.update(file_digest.digest())


def _records(path: Path, digest) -> Iterator[Record]:
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


def _text_records(path: Path, lines: Iterable[str], line: int = 1) -> Iterator[Record]:
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
                yield Record(path, "text", piece, line, False)
            buf, size = [], 0
    piece = "".join(buf)
    if started or piece.strip():
        yield Record(path, "text", piece, line, True)


def _jsonl_records(path: Path, lines: Iterable[tuple[int, str]]) -> Iterator[Record]:
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
            yield Record(path, kind, payload, n, True)
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
