import dataclasses

import pytest
import torch

from trainer.config import PRESETS, ModelConfig
from trainer.model import KVCache, Transformer, token_losses


def test_preset_sizes():
    assert Transformer(PRESETS["tiny"]).num_params() < 1_000_000
    assert 10e6 <= Transformer(PRESETS["small"]).num_params() <= 30e6
    # SmolLM2-135M has exactly 134,515,008 parameters (tied embeddings)
    assert Transformer(PRESETS["smollm2-135m"]).num_params() == 134_515_008


@pytest.mark.parametrize("tie", [True, False])
def test_logits_match_transformers_llama(tie):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = dataclasses.replace(PRESETS["tiny"], tie_embeddings=tie, rope_theta=50000.0)
    ours = Transformer(cfg).eval()
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.dim,
        intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        max_position_embeddings=cfg.max_seq_len,
        rope_theta=cfg.rope_theta,
        rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=tie,
    )
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    state = {
        k if k.startswith("lm_head") else f"model.{k}": v for k, v in ours.state_dict().items()
    }
    hf.load_state_dict(state, strict=True)
    idx = torch.randint(0, cfg.vocab_size, (2, 40))
    with torch.no_grad():
        diff = (ours(idx) - hf(idx).logits).abs().max().item()
    assert diff < 1e-5


def test_kv_cache_decoding_equals_full_forward():
    torch.manual_seed(0)
    cfg = PRESETS["tiny"]
    model = Transformer(cfg).eval()
    idx = torch.randint(0, cfg.vocab_size, (3, 24))
    with torch.no_grad():
        full = model(idx)
        cache = KVCache(cfg, 3, 32, "cpu", torch.float32)
        parts = [model(idx[:, :10], cache=cache)]
        parts += [model(idx[:, t : t + 1], cache=cache) for t in range(10, 24)]
    assert cache.pos == 24
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-5)


def test_last_only_returns_one_position():
    cfg = PRESETS["tiny"]
    model = Transformer(cfg).eval()
    idx = torch.randint(0, cfg.vocab_size, (2, 16))
    with torch.no_grad():
        assert model(idx, last_only=True).shape == (2, 1, cfg.vocab_size)
        assert torch.allclose(model(idx, last_only=True)[:, 0], model(idx)[:, -1], atol=1e-6)


def test_tied_embeddings_share_storage():
    model = Transformer(PRESETS["tiny"])
    assert model.lm_head.weight.data_ptr() == model.embed_tokens.weight.data_ptr()
    untied = Transformer(dataclasses.replace(PRESETS["tiny"], tie_embeddings=False))
    assert untied.lm_head.weight.data_ptr() != untied.embed_tokens.weight.data_ptr()


def test_token_losses_ignore_masked_targets():
    logits = torch.randn(1, 3, 10)
    targets = torch.tensor([[1, -100, 3]])
    losses = token_losses(logits, targets)
    assert losses[0, 1] == 0 and losses[0, 0] > 0


def test_config_validation_names_field_and_value():
    with pytest.raises(ValueError, match=r"model.n_kv_heads=3 must divide model.n_heads=4"):
        ModelConfig(n_heads=4, n_kv_heads=3).validate()
    with pytest.raises(ValueError, match=r"model.dim=0 must be >= 1"):
        ModelConfig(dim=0).validate()
