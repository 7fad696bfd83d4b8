from __future__ import annotations

from pathlib import Path

from aimass_common.settings import aimass_home, default_registry


def test_aimass_home_honours_the_environment_at_each_call(monkeypatch, tmp_path):
    monkeypatch.setenv("AIMASS_HOME", str(tmp_path / "a"))
    assert aimass_home() == tmp_path / "a"
    monkeypatch.setenv("AIMASS_HOME", str(tmp_path / "b"))  # set after import: still honoured
    assert aimass_home() == tmp_path / "b"


def test_aimass_home_defaults_to_dot_aimass_when_unset_or_empty(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("AIMASS_HOME", raising=False)
    assert aimass_home() == tmp_path / ".aimass"
    monkeypatch.setenv("AIMASS_HOME", "")
    assert aimass_home() == tmp_path / ".aimass"


def test_aimass_home_reads_a_given_environment():
    assert aimass_home({"AIMASS_HOME": "/srv/aimass"}) == Path("/srv/aimass")


def test_default_registry_is_aimass_registry_else_the_home_folder():
    assert default_registry({"AIMASS_REGISTRY": "s3://b/p", "AIMASS_HOME": "/h"}) == "s3://b/p"
    assert default_registry({"AIMASS_HOME": "/h"}) == "/h/registry"
    assert default_registry({"AIMASS_REGISTRY": "", "AIMASS_HOME": "/h"}) == "/h/registry"
