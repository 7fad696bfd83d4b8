"""Checkpoint folders: written whole, replaced whole, readable as any folder beside them."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from trainer.checkpoint import load_model, write_checkpoint
from trainer.config import PRESETS
from trainer.model import Transformer
from trainer.tokenizer import train_bpe


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    return Transformer(PRESETS["tiny"]), train_bpe(iter(["some words to learn " * 20]), 300)


def modes(folder):
    out = {".": stat.S_IMODE(folder.stat().st_mode)}
    for path in folder.rglob("*"):
        out[path.relative_to(folder).as_posix()] = stat.S_IMODE(path.stat().st_mode)
    return out


def test_a_checkpoint_gets_the_modes_of_plain_files_and_folders(parts, tmp_path):
    model, tokenizer = parts
    previous = os.umask(0o022)
    try:
        folder = write_checkpoint(tmp_path / "ckpt", model, tokenizer, {"step": 1}, {"x": 1})
        assert os.umask(0o022) == 0o022  # writing did not change the process umask
    finally:
        os.umask(previous)
    found = modes(folder)
    assert found.pop(".") == 0o755
    assert set(found) >= {"model.safetensors", "config.json", "meta.json", "train_state.pt"}
    assert set(found.values()) == {0o644}


def test_a_checkpoint_replaces_the_old_one_whole_or_not_at_all(parts, tmp_path, monkeypatch):
    model, tokenizer = parts
    folder = write_checkpoint(tmp_path / "ckpt", model, tokenizer, {"step": 1})
    write_checkpoint(folder, model, tokenizer, {"step": 2})
    assert load_model(folder)[2]["step"] == 2

    def broken_save(self, path):
        raise OSError("disk full")

    monkeypatch.setattr(type(tokenizer), "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        write_checkpoint(folder, model, tokenizer, {"step": 3})
    assert load_model(folder)[2]["step"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no staging or old folder left
