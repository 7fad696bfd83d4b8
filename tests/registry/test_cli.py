"""The acceptance commands, as a user runs them (`python -m aimass_cli registry ...`)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli
from tests.registry.helpers import tree, write_package


@pytest.fixture
def cli(registry_uri, tmp_path):
    env = {"AIMASS_HOME": str(tmp_path / "home"), "AIMASS_USER": "ci-bot"}

    def run(*args: str):
        return run_cli("registry", "--registry", registry_uri, *args, env=env, timeout=120)

    return run


def _ok(result) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_acceptance_commands(cli, tmp_path):
    v1 = write_package(tmp_path / "v1", ppl=10.0)
    v2 = write_package(tmp_path / "v2", ppl=11.0, weights=b"second")  # +10% perplexity
    assert _ok(cli("push", str(v1), "--name", "tiny")).strip() == "1"
    assert _ok(cli("push", str(v2), "--name", "tiny")).strip() == "2"
    assert "tiny  2 versions, latest 2" in _ok(cli("ls"))
    assert json.loads(_ok(cli("show", "tiny:1", "--json"))) == json.loads(
        (v1 / "manifest.json").read_text()
    )
    assert "onnx-fp32" in _ok(cli("show", "tiny"))

    assert _ok(cli("alias", "tiny", "production", "1", "--expect", "none")).strip() == (
        "tiny@production: none -> 1"
    )
    lost = cli("alias", "tiny", "production", "2", "--expect", "2")
    assert lost.returncode == 3 and "points to 1" in lost.stderr

    refused = cli("promote", "tiny", "2", "--to", "production")
    assert refused.returncode == 4
    assert "refused by gate perplexity" in refused.stderr and len(refused.stderr.splitlines()) == 1
    forced = cli("promote", "tiny", "2", "--to", "production", "--force")
    assert _ok(forced).strip() == "tiny@production: 1 -> 2"
    assert "gate perplexity: FAILED (forced)" in forced.stderr
    assert "tiny@staging" in _ok(cli("promote", "tiny", "1", "--to", "staging"))

    events = json.loads(_ok(cli("events", "tiny", "--json")))
    promote = [e for e in events if e["action"] == "promote" and e["alias"] == "production"]
    assert promote[0]["forced"] is True and promote[0]["who"] == "ci-bot"
    assert "promote forced  tiny@production 1 -> 2" in _ok(cli("events", "tiny"))

    assert _ok(cli("rollback", "tiny", "production")).strip() == "tiny@production: 2 -> 1"
    assert "production" in _ok(cli("ls", "tiny"))

    out = tmp_path / "pulled"
    assert _ok(cli("pull", "tiny@production", "--to", str(out))).strip() == str(out)
    assert tree(out) == tree(v1)

    assert "deleted 0 versions" in _ok(cli("gc"))  # everything is younger than 7 days


def test_exit_codes_for_bad_input_and_corruption(cli, registry_uri, tmp_path):
    pkg = write_package(tmp_path / "pkg", weights=b"w" * 3000)
    bad = cli("push", str(pkg), "--name", "../x")
    assert bad.returncode == 2 and "must not contain '/'" in bad.stderr
    missing = cli("show", "nothing")
    assert missing.returncode == 2 and "no model named 'nothing'" in missing.stderr
    _ok(cli("push", str(pkg), "--name", "tiny"))

    from registry.registry import Registry, blob_key

    reg = Registry.open(registry_uri)
    sha = next(e.sha256 for e in reg.manifest("tiny", 1).files() if e.size == 3000)
    reg.store.delete(blob_key(sha))
    reg.store.put_new(blob_key(sha), b"x" * 3000)  # the stored bytes are replaced
    corrupt = cli("pull", "tiny:1", "--to", str(tmp_path / "out"))
    assert corrupt.returncode == 5 and "does not match its sha256" in corrupt.stderr
    assert not (tmp_path / "out").exists()


def test_registry_from_the_environment_or_after_the_subcommand(tmp_path):
    pkg = write_package(tmp_path / "pkg")
    env = {"AIMASS_HOME": str(tmp_path / "home"), "AIMASS_REGISTRY": f"file://{tmp_path}/reg"}
    assert _ok(run_cli("registry", "push", str(pkg), "--name", "tiny", env=env)).strip() == "1"
    assert (tmp_path / "reg" / "models" / "tiny" / "versions").is_dir()
    other = str(tmp_path / "other")
    assert _ok(run_cli("registry", "push", str(pkg), "--name", "x", "--registry", other, env=env))
    assert _ok(run_cli("registry", "ls", env=env)).startswith("tiny")
    default = run_cli(
        "registry", "ls", env={"AIMASS_HOME": str(tmp_path / "home"), "AIMASS_REGISTRY": ""}
    )
    assert _ok(default) == "\n"  # $AIMASS_HOME/registry: empty until the first push


def test_report_attaches_and_reports_lists(cli, tmp_path):
    _ok(cli("push", str(write_package(tmp_path / "pkg")), "--name", "tiny"))
    report = tmp_path / "load.json"
    report.write_text('{"passed": true, "p95_ttft_s": 0.25}')
    assert "attached the load_test report to tiny:1" in _ok(
        cli("report", "tiny:1", "load_test", str(report), "--new")
    )
    assert json.loads(_ok(cli("reports", "tiny", "--json"))) == {
        "load_test": {"p95_ttft_s": 0.25, "passed": True}
    }
    assert _ok(cli("reports", "tiny:1")).startswith("load_test  {")
    assert "attached     load_test" in _ok(cli("show", "tiny:1"))

    again = cli("report", "tiny:1", "load_test", str(report), "--new")
    assert again.returncode == 3 and "already has a load_test report" in again.stderr
    (tmp_path / "list.json").write_text("[1, 2]")
    for args, code, says in [
        (("tiny:2", "eval", str(report)), 2, "tiny:2 does not exist"),
        (("tiny", "eval", str(report)), 2, "name the version, as NAME:VERSION"),
        (("tiny:1", "eval", str(tmp_path / "none.json")), 2, "none.json: no such file"),
        (("tiny:1", "eval", str(tmp_path / "list.json")), 2, "list.json is not a JSON object"),
        (("tiny:1", "a/b", str(report)), 2, "report kind 'a/b' must not contain '/'"),
    ]:
        bad = cli("report", *args)
        assert (bad.returncode, len(bad.stderr.splitlines())) == (code, 1), bad.stderr
        assert says in bad.stderr
