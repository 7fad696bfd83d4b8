"""Exporting the real SmolLM2-135M-Instruct (integration: a few minutes on 2 cores)."""

from __future__ import annotations

import pytest

from registry.manifest import load, verify
from tests.conftest import run_cli

pytestmark = pytest.mark.integration


def test_export_smollm2_fp32_exact_and_int4_reported(smollm2_home, tmp_path):
    env = {"AIMASS_HOME": str(smollm2_home), "OMP_NUM_THREADS": "2"}
    pkg = tmp_path / "pkg"
    out = run_cli(
        "export",
        "smollm2-135m-instruct",
        "--targets",
        "onnx-fp32,onnx-int4",
        "--max-len",
        "512",
        "--force",
        "--out",
        str(pkg),
        env=env,
        timeout=1800,
    )
    assert out.returncode == 0, out.stderr
    assert verify(pkg) == []
    manifest = load(pkg)
    fp32, int4 = manifest.reports.parity["onnx-fp32"], manifest.reports.parity["onnx-int4"]
    assert fp32.passed and fp32.exact and fp32.tokens_matched == fp32.tokens_total
    assert fp32.max_abs_logit_diff < 1e-3
    assert abs(fp32.ppl_increase) < 1e-3
    # int4 is reported, not required to match: first divergences and the perplexity increase
    assert int4.ppl_target > 0 and int4.held_out_tokens > 100
    assert int4.forced == (not int4.passed)
    print(
        f"\nSmolLM2 parity: fp32 {fp32.max_abs_logit_diff:.2e}; int4 ppl {int4.ppl_eager:.2f} → "
        f"{int4.ppl_target:.2f} ({int4.ppl_increase:+.1%}), greedy {int4.tokens_matched}/{int4.tokens_total}"
    )

    args = ["--prompt", "The capital of France is", "--max-tokens", "16", "--temperature", "0"]
    eager = run_cli("generate", "smollm2-135m-instruct", *args, env=env)
    compiled = run_cli("generate", str(pkg), "--target", "onnx-fp32", *args, env=env)
    assert compiled.returncode == 0, compiled.stderr
    assert compiled.stdout == eager.stdout
