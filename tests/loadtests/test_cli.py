"""`aimass loadtest` is registered through the aimass.commands entry point; bad options are a
one-line error with exit 2 before anything is sent."""

from __future__ import annotations

from loadtests.__main__ import main
from tests.conftest import run_cli


def test_aimass_loadtest_is_a_subcommand():
    done = run_cli("loadtest", "run", "--help", timeout=60)
    assert done.returncode == 0, done.stderr
    for option in ("--allow-host", "--scenario", "--rate", "--slo", "--max-requests", "--warmup"):
        assert option in done.stdout
    done = run_cli("loadtest", "capacity", "--help", timeout=60)
    assert done.returncode == 0 and "--max-rate" in done.stdout


def test_bad_options_name_the_field_and_send_nothing(tmp_path, capsys):
    out = tmp_path / "r"
    cases = [
        (["run", "--rate", "0"], "rate=0.0 must be in (0, 1000] req/s"),
        (["run", "--duration", "99999"], "duration_s=99999.0 must be in (0, 3600] s"),
        (["run", "--scenario", "mixed_models", "--model", "a"], "must name at least 2 models"),
        (["run", "--slo", str(tmp_path / "none.json")], "No such file"),
        (["capacity", "--factor", "1"], "--factor=1.0 must be > 1"),
    ]
    for argv, message in cases:
        assert main([*argv, "--out", str(out)]) == 2
        assert message in capsys.readouterr().err
    assert not out.exists()
