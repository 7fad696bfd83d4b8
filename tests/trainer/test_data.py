import hashlib
import json
import os
import shutil

import numpy as np
import pytest
import torch

from aimass_common import corpus as corpus_module
from aimass_common.corpus import iter_texts, scan_corpus
from trainer import data
from trainer.data import TokenDataset, build_dataset
from trainer.errors import DataError
from trainer.tokenizer import IM_END, Tokenizer, train_bpe

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Sphinx of black quartz, judge my vow!",
    "What is two plus two? Two plus two is four.",
    "Hello there. How are you today? I am fine, thank you.",
]
CHAT = [
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is two plus two?"},
            {"role": "assistant", "content": "Four."},
            {"role": "user", "content": "And the fox?"},
            {"role": "assistant", "content": "It jumps over the lazy dog."},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "Hello there."},
            {"role": "assistant", "content": "Hello! How are you today?"},
        ]
    },
]
ASSISTANT_SPANS = [
    m["content"] + IM_END + "\n" for c in CHAT for m in c["messages"] if m["role"] == "assistant"
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_bpe(iter(TEXTS * 20), 300)


def write(path, content) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return str(path)


def jsonl(*records) -> str:
    return "".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in records)


def text_corpus(tmp_path, n_copies=8):
    for i in range(n_copies):
        write(tmp_path / "corpus" / f"doc{i:02d}.txt", " ".join(TEXTS[i % 4 :] + TEXTS[: i % 4]))
    return scan_corpus(tmp_path / "corpus")


def chat_corpus(tmp_path, n_copies=6):
    write(tmp_path / "chat.jsonl", jsonl(*(CHAT * n_copies)))
    return scan_corpus(tmp_path / "chat.jsonl")


def train_ids(ds) -> np.ndarray:
    return np.setdiff1d(np.arange(ds.n_train_blocks + ds.n_val_blocks), ds.val_block_ids())


def build(corpus, tok, out, block_size=16, val_fraction=0.25, seed=7):
    return build_dataset(
        corpus, tok, out, block_size=block_size, val_fraction=val_fraction, seed=seed
    )


# --- validation ------------------------------------------------------------------------------

MSG = {"role": "user", "content": "hi"}
ANSWER = {"role": "assistant", "content": "hello"}

BAD_FILES = [
    # (file name, content, expected message part, line)
    ("a.txt", " \n\t\n", "empty", None),
    ("a.csv", "x,y\n", "unsupported file extension '.csv'", None),
    ("a.txt", b"fine\nstill fine\nbad \xff byte\n", "not valid UTF-8: byte 0xff at column 5", 3),
    ("a.txt", b"text\nwith\x00nul\n", "binary file", 2),
    ("a.txt", b"\x89PNG\r\n\x1a\n....", "binary file", None),
    ("a.txt", "hi".encode("utf-16"), "UTF-16", None),
    ("a.jsonl", jsonl({"text": "ok"}, '{"text": "oops"\n'), "malformed JSON", 2),
    (
        "a.jsonl",
        jsonl({"text": "ok"}, "\n", [1, 2]),
        "must be a JSON object, this one is a list",
        3,
    ),
    ("a.jsonl", jsonl({"body": "x"}), 'missing field "text" (pretraining) or "messages"', 1),
    ("a.jsonl", jsonl({"text": "ok"}, {"txt": "x"}), 'missing field "text"', 2),
    ("a.jsonl", jsonl({"text": 3}), '"text" must be a string, not a number', 1),
    ("a.jsonl", jsonl({"text": "a", "messages": []}), 'both "text" and "messages"', 1),
    ("a.jsonl", jsonl({"messages": "hi"}), '"messages" must be a non-empty list', 1),
    (
        "a.jsonl",
        jsonl({"messages": []}),
        '"messages" must be a non-empty list, not an empty list',
        1,
    ),
    (
        "a.jsonl",
        jsonl({"messages": [MSG, ANSWER]}, {"messages": [MSG, "hi"]}),
        "messages[1] must be an object",
        2,
    ),
    (
        "a.jsonl",
        jsonl({"messages": [{"role": "user"}, ANSWER]}),
        'messages[0] needs a string "content"',
        1,
    ),
    ("a.jsonl", jsonl({"messages": [{"role": 1, "content": "x"}]}), 'needs a string "role"', 1),
    ("a.jsonl", jsonl({"messages": [{"role": "bot", "content": "x"}]}), "unknown role 'bot'", 1),
    ("a.jsonl", jsonl({"messages": [MSG, ANSWER]}, {"messages": [MSG]}), "no assistant message", 2),
    (
        "a.jsonl",
        jsonl({"text": "a"}, {"messages": [MSG, ANSWER]}),
        "chat record but line 1 is a text record",
        2,
    ),
    (
        "a.jsonl",
        jsonl({"messages": [MSG, ANSWER]}, {"text": "a"}),
        "text record but line 1 is a chat record",
        2,
    ),
    ("a.jsonl", jsonl({"text": "  "}, "\n"), "empty", None),
]


@pytest.mark.parametrize("name,content,message,line", BAD_FILES, ids=[c[2][:30] for c in BAD_FILES])
def test_scan_rejects_bad_file_naming_file_and_line(tmp_path, name, content, message, line):
    path = write(tmp_path / name, content)
    with pytest.raises(DataError) as err:
        scan_corpus(path)
    assert message in str(err.value)
    assert err.value.path == path
    assert err.value.line == line
    assert str(err.value).startswith(path if line is None else f"{path}:{line}:")


def test_scan_names_the_bad_file_inside_a_folder(tmp_path):
    write(tmp_path / "c" / "a.txt", "good")
    bad = write(tmp_path / "c" / "sub" / "b.jsonl", jsonl({"text": "ok"}, "{nope}\n"))
    with pytest.raises(DataError, match="malformed JSON") as err:
        scan_corpus(tmp_path / "c")
    assert (err.value.path, err.value.line) == (bad, 2)


def test_scan_missing_path_and_folder_without_usable_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        scan_corpus(tmp_path / "nope")
    write(tmp_path / "c" / "notes.csv", "a,b")
    write(tmp_path / "c" / ".hidden.txt", "secret")
    write(tmp_path / "c" / ".git" / "x.txt", "secret")
    with pytest.raises(DataError, match="no .txt, .md, .jsonl files") as err:
        scan_corpus(tmp_path / "c")
    assert err.value.path == str(tmp_path / "c")


def test_scan_folder_is_sorted_skips_others_and_hashes_content_only(tmp_path):
    root = tmp_path / "c"
    write(root / "b.md", "# Title\nbody")
    write(root / "a" / "z.txt", "first")
    write(root / "a-b.txt", "dash")  # after a/z.txt: order is by path components, not strings
    write(root / "c.jsonl", jsonl(*CHAT))
    write(root / "d.jsonl", jsonl({"text": "x"}, "\n", {"text": "   "}, {"text": "y"}))
    write(root / "e.txt", "\n \n")  # whitespace only: no document, not an error in a folder
    write(root / "skip.py", "print()")
    write(root / ".cache" / "x.txt", "hidden")
    corpus = scan_corpus(root)
    assert [p.relative_to(root).as_posix() for p in corpus.files] == [
        "a/z.txt",
        "a-b.txt",
        "b.md",
        "c.jsonl",
        "d.jsonl",
        "e.txt",
    ]
    assert corpus.kind == "chat"
    assert corpus.n_documents == 1 + 1 + 1 + 2 + 2
    assert corpus.n_bytes == sum(p.stat().st_size for p in corpus.files)
    assert list(iter_texts(corpus))[:3] == ["first", "dash", "# Title\nbody"]
    assert "Four." in list(iter_texts(corpus))

    moved = shutil.copytree(root, tmp_path / "moved")
    assert scan_corpus(moved).sha256 == corpus.sha256
    write(moved / "b.md", "# Title\nbody!")
    assert scan_corpus(moved).sha256 != corpus.sha256


def test_scan_text_corpus_kind(tmp_path):
    corpus = text_corpus(tmp_path)
    assert corpus.kind == "text" and corpus.n_documents == 8
    assert scan_corpus(write(tmp_path / "one.txt", "\ufeffhello")).n_documents == 1


# --- building --------------------------------------------------------------------------------


def test_text_build_packs_documents_with_eos(tmp_path, tok):
    corpus = text_corpus(tmp_path)
    ds = build(corpus, tok, tmp_path / "ds")
    tokens = np.fromfile(tmp_path / "ds" / "tokens.bin", dtype=np.uint16)
    expected = []
    for path in corpus.files:
        expected += tok.encode(path.read_text()) + [tok.eos_id]
    assert tokens.tolist() == expected
    assert ds.n_tokens == len(expected) and ds.kind == "text"
    assert (
        ds.tokens_sha256
        == hashlib.sha256((tmp_path / "ds" / "tokens.bin").read_bytes()).hexdigest()
    )
    meta = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    assert meta["dtype"] == "uint16" and meta["corpus_sha256"] == corpus.sha256
    assert meta["n_train_blocks"] + meta["n_val_blocks"] == (len(expected) - 1) // 16
    assert not (tmp_path / "ds" / "loss_mask.bin").exists()
    assert sorted(os.listdir(tmp_path / "ds")) == ["dataset.json", "tokens.bin"]


def test_streaming_in_small_pieces_gives_the_same_tokens_as_whole_files(tmp_path, tok, monkeypatch):
    big = "\n".join(TEXTS * 5)
    write(tmp_path / "c" / "a.txt", big)
    write(tmp_path / "c" / "b.jsonl", jsonl({"text": big}))
    corpus = scan_corpus(tmp_path / "c")
    whole = build(corpus, tok, tmp_path / "whole").tokens.tolist()
    monkeypatch.setattr(corpus_module, "_PIECE_CHARS", 30)
    monkeypatch.setattr(data, "_CHUNK_CHARS", 50)
    assert len(list(iter_texts(corpus))) > 10
    pieces = build(corpus, tok, tmp_path / "pieces").tokens.tolist()
    # two documents, one EOS after each, the same text; only merges across a cut may differ
    for tokens in (whole, pieces):
        first = tokens.index(tok.eos_id)
        assert tokens.count(tok.eos_id) == 2 and tokens[-1] == tok.eos_id
        assert tok.decode(tokens[:first]) == big == tok.decode(tokens[first + 1 : -1])


def test_chat_loss_mask_covers_exactly_the_assistant_turns(tmp_path, tok):
    corpus = chat_corpus(tmp_path, n_copies=1)
    ds = build(corpus, tok, tmp_path / "ds", block_size=8, val_fraction=0)
    tokens, mask = np.asarray(ds.tokens), np.asarray(ds.loss_mask)
    runs, current = [], []
    for t, m in zip(tokens.tolist(), mask.tolist(), strict=True):
        if m:
            current.append(t)
        elif current:
            runs.append(tok.decode(current))
            current = []
    assert runs == ASSISTANT_SPANS
    # the rendered conversations, each followed by an EOS that is not learned
    eos_at = np.flatnonzero(tokens == tok.eos_id)
    assert len(eos_at) == len(CHAT) and eos_at[-1] == len(tokens) - 1 and not mask[eos_at].any()
    assert tok.decode(tokens[: eos_at[0]].tolist()) == tok.render_chat(CHAT[0]["messages"])

    # the same spans come back through get_batch's targets
    all_blocks = np.arange(ds.n_train_blocks)
    _, y = ds.get_batch(all_blocks)
    learned = y[y != -100].tolist()
    assert learned == [t for t, m in zip(tokens[1:], mask[1:], strict=True) if m][: len(learned)]
    assert ds.count_targets(all_blocks) == len(learned)


def test_mixed_corpus_is_chat_and_learns_all_of_the_text(tmp_path, tok):
    write(tmp_path / "c" / "a.txt", TEXTS[0])
    write(tmp_path / "c" / "b.jsonl", jsonl(*CHAT))
    ds = build(scan_corpus(tmp_path / "c"), tok, tmp_path / "ds", block_size=8, val_fraction=0)
    n_text = len(tok.encode(TEXTS[0])) + 1
    assert ds.kind == "chat"
    assert np.asarray(ds.loss_mask[:n_text]).all()


def test_build_rejects_too_little_text(tmp_path, tok):
    corpus = scan_corpus(write(tmp_path / "tiny.txt", "Hello there."))
    n = len(tok.encode("Hello there.")) + 1
    with pytest.raises(
        DataError,
        match=rf"too little text: {n} tokens after tokenization, one training "
        r"block needs block_size\+1 = 65; .*--set block_size=",
    ) as err:
        build(corpus, tok, tmp_path / "ds", block_size=64)
    assert err.value.path == str(corpus.path)
    with pytest.raises(DataError, match=r"val_fraction=0.5 needs 2 .*--set val_fraction=0"):
        build(corpus, tok, tmp_path / "ds", block_size=n - 1, val_fraction=0.5)
    assert build(corpus, tok, tmp_path / "ds", block_size=n - 1, val_fraction=0).n_train_blocks == 1
    assert sorted(os.listdir(tmp_path / "ds")) == [
        "dataset.json",
        "tokens.bin",
    ]  # no temp files left


def test_build_notices_a_corpus_changed_since_the_scan(tmp_path, tok):
    corpus = text_corpus(tmp_path)
    write(corpus.files[0], "changed")
    with pytest.raises(DataError, match="changed since it was scanned"):
        build(corpus, tok, tmp_path / "ds")
    assert not (tmp_path / "ds" / "dataset.json").exists()


def test_build_reuses_matching_dataset_and_rebuilds_when_inputs_change(tmp_path, tok, monkeypatch):
    corpus = text_corpus(tmp_path)
    calls = []
    real = Tokenizer.encode_batch
    monkeypatch.setattr(
        Tokenizer, "encode_batch", lambda self, texts: calls.append(1) or real(self, texts)
    )
    first = build(corpus, tok, tmp_path / "ds")
    stamp = (tmp_path / "ds" / "tokens.bin").stat().st_mtime_ns
    assert len(calls) == 1

    again = build(scan_corpus(corpus.path), tok, tmp_path / "ds")
    assert len(calls) == 1 and (tmp_path / "ds" / "tokens.bin").stat().st_mtime_ns == stamp
    assert again.tokens_sha256 == first.tokens_sha256

    rebuilt = build(corpus, tok, tmp_path / "ds", block_size=8)
    assert len(calls) == 2 and rebuilt.block_size == 8
    assert TokenDataset.open(tmp_path / "ds").block_size == 8

    (tmp_path / "ds" / "tokens.bin").write_bytes(b"\0\0")  # truncated: rebuilt, not trusted
    assert build(corpus, tok, tmp_path / "ds", block_size=8).tokens_sha256 == first.tokens_sha256
    assert len(calls) == 3


def test_wide_vocab_uses_uint32(tmp_path, tok):
    class Wide(Tokenizer):
        vocab_size = 70_000

    ds = build(text_corpus(tmp_path), Wide(tok.tok, stop_tokens=[IM_END]), tmp_path / "ds")
    assert ds.meta["dtype"] == "uint32"
    assert (
        ds.tokens.tolist() == build(text_corpus(tmp_path), tok, tmp_path / "narrow").tokens.tolist()
    )


def test_open_missing_or_damaged_dataset(tmp_path, tok):
    with pytest.raises(DataError, match="holds no dataset"):
        TokenDataset.open(tmp_path)
    build(text_corpus(tmp_path), tok, tmp_path / "ds")
    (tmp_path / "ds" / "tokens.bin").write_bytes(b"\0\0")
    with pytest.raises(DataError, match="do not match dataset.json"):
        TokenDataset.open(tmp_path / "ds")


# --- split, order, batches ---------------------------------------------------------------------


def test_split_is_deterministic_disjoint_and_sized(tmp_path, tok):
    corpus = text_corpus(tmp_path)
    a = build(corpus, tok, tmp_path / "a", block_size=4, val_fraction=0.2, seed=1)
    b = build(corpus, tok, tmp_path / "b", block_size=4, val_fraction=0.2, seed=1)
    c = build(corpus, tok, tmp_path / "c", block_size=4, val_fraction=0.2, seed=2)
    n_blocks = (a.n_tokens - 1) // 4
    val, train = a.val_block_ids(), train_ids(a)
    assert len(val) == round(0.2 * n_blocks) == a.n_val_blocks
    assert sorted([*val, *train]) == list(range(n_blocks))
    assert list(val) == sorted(val) and val.dtype == np.int64
    assert np.array_equal(val, b.val_block_ids())
    assert not np.array_equal(val, c.val_block_ids())
    assert build(corpus, tok, tmp_path / "d", block_size=4, val_fraction=0.0).n_val_blocks == 0


def test_train_order_is_epochs_of_permutations_and_chunking_invariant(tmp_path, tok):
    ds = build(text_corpus(tmp_path), tok, tmp_path / "ds", block_size=4)
    n = ds.n_train_blocks
    stream = ds.train_block_ids(0, 3 * n + 5)
    assert stream.dtype == np.int64
    epochs = [stream[i * n : (i + 1) * n] for i in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == list(train_ids(ds))
    assert not np.array_equal(epochs[0], epochs[1])

    rng = np.random.default_rng(0)
    pos, parts = 0, []
    while pos < len(stream):
        k = int(rng.integers(1, n + 3))
        parts.append(ds.train_block_ids(pos, min(k, len(stream) - pos)))
        pos += len(parts[-1])
    assert np.array_equal(np.concatenate(parts), stream)
    fresh = TokenDataset.open(tmp_path / "ds")  # a resumed run starts mid-stream
    assert np.array_equal(fresh.train_block_ids(2 * n - 3, 10), stream[2 * n - 3 : 2 * n + 7])


def test_get_batch_shapes_and_shift(tmp_path, tok):
    ds = build(text_corpus(tmp_path), tok, tmp_path / "ds", block_size=16)
    ids = ds.train_block_ids(0, 4)
    x, y = ds.get_batch(ids)
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    tokens = np.asarray(ds.tokens, dtype=np.int64)
    for row, i in enumerate(ids):
        assert x[row].tolist() == tokens[i * 16 : i * 16 + 16].tolist()
        assert y[row].tolist() == tokens[i * 16 + 1 : i * 16 + 17].tolist()
    assert ds.count_targets(ids) == 4 * 16
    last = (
        ds.n_tokens - 1
    ) // 16 - 1  # the last block reaches the final token or stops short of it
    assert (last + 1) * 16 + 1 <= ds.n_tokens
    assert ds.get_batch([last])[1].shape == (1, 16)


def test_chat_get_batch_ignores_targets_outside_the_loss(tmp_path, tok):
    ds = build(chat_corpus(tmp_path), tok, tmp_path / "ds", block_size=16)
    ids = ds.val_block_ids()
    x, y = ds.get_batch(ids)
    mask = np.asarray(ds.loss_mask)
    for row, i in enumerate(ids):
        targets = mask[i * 16 + 1 : i * 16 + 17]
        assert ((y[row] == -100).numpy() == (targets == 0)).all()
        assert x[row].tolist() == ds.tokens[i * 16 : i * 16 + 16].tolist()
    assert ds.count_targets(ids) == int((y != -100).sum())


def test_chat_needs_a_template_that_accepts_and_extends_the_conversation(tmp_path, tok):
    corpus = chat_corpus(tmp_path, n_copies=1)
    no_template = Tokenizer(tok.tok, chat_template=None)
    with pytest.raises(DataError, match="no chat template"):
        build(corpus, no_template, tmp_path / "a")
    strict = Tokenizer(
        tok.tok,
        chat_template="{% if messages[0]['role'] == 'system' %}"
        "{{ raise_exception('no system prompts') }}{% endif %}{{ messages | length }}",
    )
    with pytest.raises(DataError, match="rejected this conversation: no system prompts") as err:
        build(corpus, strict, tmp_path / "b")
    assert (err.value.path, err.value.line) == (str(corpus.path), 1)
    reversed_ = Tokenizer(
        tok.tok, chat_template="{% for m in messages | reverse %}{{ m['content'] }}{% endfor %}"
    )
    with pytest.raises(DataError, match="does not render this conversation turn by turn"):
        build(corpus, reversed_, tmp_path / "c")
