"""Promotion gates on the parity reports' fidelity figures (top-1 agreement, KL, the target's
own perplexity increase): limits at their edges, reports that predate the figures, the policy
file, and a refusal through Registry.promote."""

from __future__ import annotations

import msgspec
import pytest

from registry import gates
from registry.errors import GateFailed
from registry.gates import GatePolicy, check, decode_config
from registry.manifest import Manifest, encode, load
from registry.registry import Registry
from registry.stores import open_store
from tests.registry.helpers import write_package

FIGURES = {
    "kl_mean": 0.004,
    "kl_median": 0.001,
    "kl_p99": 0.05,
    "kl_max": 0.4,
    "top1_agreement": 0.985,
    "positions": 512,
    "min_top1_agreement": 0.98,
}


def with_parity(m: Manifest, **fields) -> Manifest:
    """`m` with its onnx-fp32 parity report's fields replaced."""
    report = msgspec.structs.replace(m.reports.parity["onnx-fp32"], **fields)
    reports = msgspec.structs.replace(m.reports, parity={"onnx-fp32": report})
    return msgspec.structs.replace(m, reports=reports)


@pytest.fixture
def package(tmp_path) -> Manifest:
    """A package whose parity report measured the fidelity figures."""
    return with_parity(load(write_package(tmp_path / "pkg")), **FIGURES)


def fidelity(m: Manifest, **policy) -> gates.GateResult:
    results = check(m, None, GatePolicy(max_ppl_increase=None, **policy))
    [result] = [r for r in results if r.gate == "fidelity"]
    return result


def test_no_fidelity_gate_unless_the_policy_sets_a_limit(package):
    assert [r.gate for r in check(package, None, GatePolicy())] == ["parity", "perplexity"]
    both = check(package, None, GatePolicy(parity_max_kl_mean=0.01))
    assert [r.gate for r in both] == ["parity", "fidelity", "perplexity"]


@pytest.mark.parametrize(
    ("top1", "passed"), [(0.98, True), (0.985, True), (0.979, False), (0.5, False)]
)
def test_min_top1_agreement_at_its_edge(package, top1, passed):
    r = fidelity(with_parity(package, top1_agreement=top1), parity_min_top1_agreement=0.98)
    assert r.passed is passed
    if passed:
        assert r.detail == f"onnx-fp32: top1_agreement {top1:.4g} >= 0.98"
    else:
        assert r.detail == f"onnx-fp32: top1_agreement {top1:.4g} (must be >= 0.98)"


def test_kl_and_perplexity_limits_name_every_failed_figure(package):
    policy = {
        "parity_max_kl_mean": 0.001,
        "parity_max_kl_p99": 0.01,
        "parity_max_ppl_increase": 0.01,
        "parity_min_top1_agreement": 0.98,
    }
    worse = with_parity(package, ppl_increase=0.18)
    r = fidelity(worse, **policy)
    assert not r.passed
    assert r.detail == (
        "onnx-fp32: kl_mean 0.004 (must be <= 0.001); onnx-fp32: kl_p99 0.05 (must be <= 0.01); "
        "onnx-fp32: ppl_increase 0.18 (must be <= 0.01)"
    )
    ok = fidelity(package, parity_max_kl_mean=0.004, parity_max_kl_p99=0.05)
    assert ok.passed and ok.detail == "onnx-fp32: kl_mean 0.004 <= 0.004, kl_p99 0.05 <= 0.05"


def test_a_report_that_predates_the_figures_fails_a_limit_on_them(tmp_path):
    old = load(write_package(tmp_path / "pkg"))  # no fidelity figures, as before they existed
    r = fidelity(old, parity_min_top1_agreement=0.98, parity_max_ppl_increase=0.01)
    assert not r.passed
    assert r.detail == "onnx-fp32: top1_agreement not measured (must be >= 0.98)"


def test_the_policys_targets_are_the_ones_held(package):
    r = fidelity(package, targets=["onnx-int4"], parity_max_kl_mean=0.01)
    assert not r.passed and r.detail == "onnx-int4: no parity report"
    assert fidelity(package, targets=["onnx-fp32"], parity_max_kl_mean=0.01).passed


def test_the_policy_file_takes_the_limits_and_refuses_unknown_ones():
    config = decode_config(
        b'{"production": {"parity_min_top1_agreement": 0.98, "parity_max_kl_mean": 0.01}}'
    )
    assert config["production"].parity_min_top1_agreement == 0.98
    assert config["production"].parity_max_kl_p99 is None
    with pytest.raises(ValueError, match="parity_min_top1"):
        decode_config(b'{"production": {"parity_min_top1": 0.98}}')


def test_promote_is_refused_by_the_fidelity_gate(tmp_path):
    reg = Registry(open_store(str(tmp_path / "registry")), user="tester")
    folder = write_package(tmp_path / "pkg")
    m = with_parity(load(folder), **(FIGURES | {"top1_agreement": 0.91}))
    (folder / "manifest.json").write_bytes(encode(m))
    reg.push(folder, "tiny")
    reg.set_gates_config(b'{"production": {"parity_min_top1_agreement": 0.98}}')
    with pytest.raises(
        GateFailed,
        match=r"refused by gate fidelity \(.*onnx-fp32: top1_agreement 0\.91 \(must be >= 0\.98\)",
    ):
        reg.promote("tiny", 1, "production")
    assert reg.promote("tiny", 1, "staging").changed  # an alias the policy does not list
