from __future__ import annotations

import json

import pytest

from engine.detokenizer import IncrementalDecoder, StopMatcher, TokenBytes
from trainer.tokenizer import train_bpe

TEXT = (
    "Hello, wörld! Ça coûte 12.50 €. Größe: 3 × 4. 日本語のテキスト。"
    " مرحبا بالعالم 🙂👍🏽 def f(x):\n\treturn x ** 2  # done"
)


@pytest.fixture(scope="module")
def tokenizer(corpus_file):
    # a small vocabulary splits multi-byte characters across tokens: the case that matters
    return train_bpe(iter([corpus_file.read_text(), TEXT]), 300)


def test_streamed_text_equals_batch_decode_and_never_emits_half_a_character(tokenizer):
    ids = tokenizer.encode(TEXT + "<|endoftext|>")
    tb = TokenBytes(tokenizer.tok.to_str())
    decoder = IncrementalDecoder(tb)
    pieces = [decoder.push(t) for t in ids]
    pieces.append(decoder.flush())
    assert "".join(pieces) == TEXT  # the special token contributes nothing
    assert not any("\ufffd" in p for p in pieces)
    # at least one character really was split over tokens, so holding back was exercised
    assert any(p == "" for p in pieces[:-2])


def test_an_incomplete_character_at_the_end_becomes_a_replacement_char(tokenizer):
    tb = TokenBytes(tokenizer.tok.to_str())
    ids = tokenizer.encode("🙂")
    assert len(ids) > 1
    decoder = IncrementalDecoder(tb)
    assert "".join(decoder.push(t) for t in ids[:-1]) == ""
    assert decoder.flush() == "\ufffd"


def test_every_token_s_bytes_decode_as_the_tokenizer_decodes_it_alone(tokenizer):
    tb = TokenBytes(tokenizer.tok.to_str())
    assert tb.vocab_size == tokenizer.tok.get_vocab_size(with_added_tokens=True)
    for i in range(tb.vocab_size):
        expected = tokenizer.tok.decode([i], skip_special_tokens=True)
        assert tb[i].decode("utf-8", errors="replace") == expected, i
    assert tb[-1] == tb[tb.vocab_size] == b""


def test_a_piece_with_characters_outside_the_byte_alphabet_keeps_the_bytes_it_has(tokenizer):
    spec = json.loads(tokenizer.tok.to_str())
    # "Ġ" is byte 0x20 (a space), "é" byte 0xE9; "€" and "\x07" stand for no byte
    spec["model"]["vocab"] = {"Ġa": 0, "é€\x07b": 1}
    spec["added_tokens"] = [{"id": 2, "content": "<|end|>", "special": True}]
    tb = TokenBytes(json.dumps(spec))
    assert (tb[0], tb[1], tb[2], tb.vocab_size) == (b" a", b"\xe9b", b"", 3)


def test_a_tokenizer_that_is_not_byte_level_bpe_is_refused(tokenizer):
    spec = json.loads(tokenizer.tok.to_str())
    spec["model"] = {"type": "Unigram", "vocab": [["a", 0.0]]}
    with pytest.raises(ValueError, match="'Unigram' without a token → id vocabulary"):
        TokenBytes(json.dumps(spec))
    spec["decoder"] = {"type": "Metaspace"}
    with pytest.raises(ValueError, match="decoder is 'Metaspace'"):
        TokenBytes(json.dumps(spec))


@pytest.mark.parametrize(
    "pieces, stops, emitted, stopped",
    [
        (["Hello ", "wor", "ld"], ("world",), "Hello ", True),  # across tokens
        (["a", "b", "STO", "P", "c"], ("STOP",), "ab", True),
        (["x\n", "\nrest"], ("\n\n",), "x", True),
        (["ST", "ART"], ("STOP",), "START", False),  # a false start is released
        (["abc"], (), "abc", False),
        (["one two", " three"], ("three", "two"), "one ", True),  # the earliest stop wins
    ],
)
def test_stop_strings_are_matched_across_tokens_and_never_leaked(pieces, stops, emitted, stopped):
    m = StopMatcher(stops)
    out = "".join(m.push(p) for p in pieces) + m.flush()
    assert out == emitted
    assert m.stopped is stopped


def test_text_that_may_start_a_stop_string_is_held_until_decided():
    m = StopMatcher(("</end>",))
    assert m.push("value </") == "value "
    assert m.push("en") == ""
    assert m.push("try") == "</entry"
