"""`aimass pipeline promote`'s refusals: bad input is one line naming the option, the value and
the limit, exit 2, before anything is built or moved."""

from __future__ import annotations

import pytest

from aimass_cli import main
from controlplane.db import Database
from registry.registry import Registry


@pytest.fixture
def base(tmp_path, corpus_file):
    registry = tmp_path / "registry"
    Registry.open(str(registry))
    return ["pipeline", "promote", "--name", "tiny", "--registry", str(registry),
            "--work", str(tmp_path / "work")]  # fmt: skip


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--canary-weight", "1.5"], "--canary-weight=1.5 must be in (0, 1)"),
        (["--watch", "0"], "--watch=0.0 must be in (0, 86400] s"),
        (["--load-rate", "nan"], "--load-rate=nan must be in (0, 1000] req/s"),
        (["--canary-max-ttft-ratio", "0.5"], "--canary-max-ttft-ratio=0.5 must be >= 1"),
        (["--engine-args", "--slots 1 --bogus"], "'--bogus' is not an engine option"),
        (["--engine-args", "--slots one"], "argument --slots: invalid int value: 'one'"),
        (["--gateway", "gw:8000"], "--gateway 'gw:8000' must be an http:// or https:// URL"),
        (["--slo", "/nonexistent.json"], "--slo /nonexistent.json: no such file or folder"),
    ],
)
def test_bad_options_are_refused_naming_the_option(base, tmp_path, capsys, args, message):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    assert main([*base, "--checkpoint", str(ckpt), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err, err
    assert not (tmp_path / "work").exists()  # nothing was started


def test_source_options_must_agree(base, tmp_path, corpus_file, capsys):
    assert main([*base, "--corpus", str(corpus_file)]) == 2
    assert "--corpus needs --preset" in capsys.readouterr().err
    assert main([*base, "--checkpoint", str(tmp_path), "--preset", "tiny"]) == 2
    assert "--preset and --set apply to --corpus only" in capsys.readouterr().err
    assert main([*base, "--checkpoint", str(tmp_path)]) == 2  # a folder with no checkpoint
    assert f"--checkpoint {tmp_path}:" in capsys.readouterr().err


def test_a_job_that_does_not_exist_is_bad_input(base, tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'cp.db'}"
    with Database.migrated(url):
        pass
    assert main([*base, "--job", "ftjob-missing", "--database", url]) == 2
    assert "--job ftjob-missing: no fine-tuning job 'ftjob-missing'" in capsys.readouterr().err


def test_help_says_what_happens_without_a_gateway(capsys):
    with pytest.raises(SystemExit):
        main(["pipeline", "promote", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert (
        "without --gateway the watch is skipped, recorded as skipped ('no gateway to watch')" in out
    )
    assert "4 a gate stopped the candidate" in out
