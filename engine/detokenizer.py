"""Streaming text out of token ids: UTF-8-safe incremental decoding and stop strings.

A byte-level BPE token is a run of bytes, not of characters: "é" may be split over two tokens,
an emoji over four. Decoding each token alone would emit U+FFFD halves; decoding the whole
output again at every step costs O(n²). Here every token id maps once to its bytes, and an
incremental UTF-8 decoder holds an incomplete character until its last byte arrives, so each
step costs only the new token. The text is the same as `tokenizer.decode(ids,
skip_special_tokens=True)` (a test checks it on multilingual text).

Stop strings are matched on that text across token boundaries: text that could be the start of
a stop string is held back until it is known not to be one, and neither the stop string nor
anything after it reaches the client (OpenAI's semantics).
"""

from __future__ import annotations

import codecs

import msgspec


def _unicode_to_bytes() -> dict[str, int]:
    """The inverse of GPT-2's bytes → printable characters table used by ByteLevel BPE."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, n = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + n)] = b
            n += 1
    return chars


_BYTES = _unicode_to_bytes()
# str.translate's table from a ByteLevel piece to the latin-1 text of its bytes; a character
# below 256 that stands for no byte is dropped
_TRANSLATION = {b: None for b in range(256)} | {ord(c): chr(b) for c, b in _BYTES.items()}


class _AddedToken(msgspec.Struct):
    id: int
    content: str
    special: bool = False


class _Decoder(msgspec.Struct):
    type: str | None = None
    decoders: list[_Decoder] = []


class _Model(msgspec.Struct):
    type: str | None = None
    vocab: dict[str, int] | list | None = None


class _TokenizerSpec(msgspec.Struct):
    """The parts of a Hugging Face tokenizer.json the table needs (the merges, most of the
    file, are skipped unread)."""

    model: _Model
    decoder: _Decoder | None = None
    added_tokens: list[_AddedToken] = []


class TokenBytes:
    """token id → the bytes it stands for; special tokens → b"" (never shown as text).

    Built from the file's vocabulary with one str.translate per token (~40 ms for SmolLM2's
    49,152 tokens), not through `tokenizers` one id at a time (~0.4 s, most of it building a
    Tokenizer the table did not need): cheap enough to build at every load, so nothing is
    cached beside the package to go stale when the tokenizer changes."""

    def __init__(self, tokenizer_json: str):
        try:
            spec = msgspec.json.decode(tokenizer_json, type=_TokenizerSpec)
        except msgspec.ValidationError as e:
            raise ValueError(f"tokenizer.json is not a Hugging Face tokenizer: {e}") from None
        decoder = spec.decoder or _Decoder()
        kinds = {decoder.type} | {d.type for d in decoder.decoders}
        if "ByteLevel" not in kinds:
            raise ValueError(
                f"the tokenizer's decoder is {decoder.type!r}; the engine streams "
                "byte-level BPE tokenizers only (as every importer and the trainer write)"
            )
        vocab = spec.model.vocab
        if not isinstance(vocab, dict):
            raise ValueError(
                f"the tokenizer's model is {spec.model.type!r} without a token → id vocabulary; "
                "the engine streams byte-level BPE tokenizers only"
            )
        added = {t.id: t for t in spec.added_tokens}
        size = max(max(vocab.values(), default=-1), max(added, default=-1)) + 1
        table = [b""] * size  # an id neither the vocabulary nor an added token names: b""
        for piece, i in vocab.items():
            table[i] = _piece_bytes(piece)
        for i, token in added.items():  # an added token overrides the vocabulary's entry
            table[i] = b"" if token.special else token.content.encode()
        self.table: list[bytes] = table
        self.vocab_size = size

    def __getitem__(self, token_id: int) -> bytes:
        return self.table[token_id] if 0 <= token_id < self.vocab_size else b""


def _piece_bytes(piece: str) -> bytes:
    """A ByteLevel piece → its bytes; characters that stand for no byte are dropped."""
    try:
        return piece.translate(_TRANSLATION).encode("latin-1")
    except UnicodeEncodeError:  # a character above 255 outside the byte alphabet: rare
        return bytes(_BYTES[c] for c in piece if c in _BYTES)


class IncrementalDecoder:
    """Bytes of tokens in, complete characters out; an invalid byte sequence becomes U+FFFD,
    as `bytes.decode(errors="replace")` would, once it is known to be invalid."""

    def __init__(self, token_bytes: TokenBytes):
        self._bytes = token_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._utf8.decode(self._bytes[token_id])

    def flush(self) -> str:
        """At the end: an incomplete last character becomes U+FFFD."""
        return self._utf8.decode(b"", final=True)


class StopMatcher:
    """Holds back text that may begin a stop string; reports the first stop string found."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self._held = ""
        self.stopped = False

    def push(self, text: str) -> str:
        """The text safe to emit now. After a stop string is found, `stopped` is set and
        everything from the stop string on is dropped (for good)."""
        if self.stopped:
            return ""
        if not self.stops:
            return text
        buf = self._held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self._held = True, ""
            return buf[: min(hits)]
        keep = self._partial(buf)
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep]

    def flush(self) -> str:
        """At the end without a stop string: the held text was not the start of one after all."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _partial(self, buf: str) -> int:
        """Length of the longest suffix of buf that is a proper prefix of a stop string."""
        best = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), best, -1):
                if buf.endswith(s[:k]):
                    best = k
                    break
        return best
