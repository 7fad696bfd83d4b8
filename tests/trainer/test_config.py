import dataclasses

import pytest

from trainer.config import (
    PRESETS,
    TrainConfig,
    build_train_config,
    parse_set_args,
    with_overrides,
)
from trainer.errors import ConfigError


def test_preset_then_file_then_overrides(tmp_path):
    path = tmp_path / "cfg.toml"
    path.write_text("lr = 0.01\nbatch_size = 8\n[model]\nn_layers = 3\n")
    cfg = build_train_config(
        "tiny", path, {"batch_size": "4", "model.dim": "96", "compile": "false"}
    )
    assert cfg.lr == 0.01 and cfg.batch_size == 4
    assert cfg.model.n_layers == 3 and cfg.model.dim == 96
    assert cfg.model.ffn_dim == PRESETS["tiny"].ffn_dim


def test_json_config_file(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text('{"max_steps": 7, "model": {"n_heads": 8, "n_kv_heads": 8}}')
    cfg = build_train_config(None, path)
    assert cfg.max_steps == 7 and cfg.model.n_kv_heads == 8


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"lr": "abc"}, r"lr='abc' must be a number"),
        ({"batch_size": "0"}, r"batch_size=0 must be >= 1"),
        ({"batch_size": "1.5"}, r"batch_size='1.5' must be an integer"),
        ({"block_size": "100000"}, r"block_size=100000 must be <= 256"),
        ({"val_fraction": "1"}, r"val_fraction=1.0 must be < 1.0"),
        ({"nope": "1"}, r"unknown setting 'nope'"),
        ({"model.nope": "1"}, r"unknown setting 'model.nope'"),
        ({"compile": "maybe"}, r"compile='maybe' must be true or false"),
        ({"device": "tpu"}, r"device='tpu' must be auto, cpu, cuda or cuda:N"),
        ({"min_lr": "1"}, r"min_lr=1.0 must be <= 0.003"),
    ],
)
def test_bad_values_name_field_value_and_limit(overrides, message):
    with pytest.raises(ConfigError, match=message):
        build_train_config("tiny", None, overrides)


def test_unknown_preset_lists_choices():
    with pytest.raises(
        ConfigError,
        match=r"preset='huge' is unknown; choose one of \['small', 'smollm2-135m', 'tiny'\]",
    ):
        build_train_config("huge")


def test_bad_config_file(tmp_path):
    bad = tmp_path / "cfg.toml"
    bad.write_text("lr = = 1")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        build_train_config(None, bad)
    with pytest.raises(ConfigError, match="does not exist"):
        build_train_config(None, tmp_path / "missing.toml")


def test_set_args_need_key_value():
    assert parse_set_args(["a=1", "model.dim = 3"]) == {"a": "1", "model.dim": "3"}
    with pytest.raises(ConfigError, match="must look like key=value"):
        parse_set_args(["lr"])


def test_finetune_defaults_take_base_architecture():
    base = PRESETS["small"]
    cfg = build_train_config(None, None, {"max_steps": "5"}, base="/x", base_model=base)
    assert cfg.model == base and cfg.lr == 1e-4 and cfg.base == "/x"


def test_configs_are_frozen_and_overrides_make_copies():
    cfg = build_train_config("tiny", None, {"lr": "1e-3"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.max_steps = 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model.dim = 8
    changed = with_overrides(cfg, {"max_steps": "3", "model.n_layers": "1"})
    assert (changed.max_steps, changed.model.n_layers, changed.lr) == (3, 1, 1e-3)
    assert (cfg.max_steps, cfg.model.n_layers) == (200, 2)
    assert PRESETS["tiny"].n_layers == 2  # the preset a config came from is untouched


@pytest.mark.parametrize("key", ["model", "lr.x", "model.dim.x", "nope.x"])
def test_overrides_refuse_keys_that_name_no_field(key):
    with pytest.raises(ConfigError, match=f"unknown setting '{key}'"):
        with_overrides(build_train_config("tiny"), {key: "1"})


def test_a_saved_config_reads_back_equal():
    cfg = build_train_config("tiny", None, {"decay_steps": "50", "model.dim": "32"})
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
