from __future__ import annotations

from aimass_common.cli import fail


def test_fail_prints_one_line_on_stderr_and_returns_the_code(capsys):
    assert fail("--port=70000 must be in 0..65535") == 2
    assert fail("disk full", 1) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == "aimass: error: --port=70000 must be in 0..65535\naimass: error: disk full\n"
