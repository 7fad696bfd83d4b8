"""Promotion gates: what a version's reports must show before an alias may point at it.

The policy lives in the registry itself, at `config/gates.json`, so every CI job promoting into
that registry applies the same rules (`aimass registry gates --set FILE` writes it):

    {"*":          {"max_ppl_increase": 0.02},
     "production": {"max_ppl_increase": 0.01, "require_loadtest": true, "loadtest_max_p95_ms": 800,
                    "parity_min_top1_agreement": 0.98, "parity_max_kl_mean": 0.01}}

An alias listed uses its own entry (in full, fields it omits take the defaults below); any
other alias uses "*"; with no file every alias gets the defaults. `promote` flags override it.

Gates, each named in a refusal:
    parity      every artifact (or `targets`) has a parity report that passed and was not forced
    fidelity    (when the policy sets a `parity_*` limit) each of those targets' parity report
                meets it: top1_agreement, kl_mean, kl_p99, ppl_increase (against the target's
                own reference); a report that never measured the figure fails
    perplexity  no worse than the alias's current version by more than `max_ppl_increase`,
                compared on the same text: reports.eval["perplexity"] when both versions have it
                (and name the same reports.eval["dataset"], if they name one), otherwise each
                target's parity ppl_target measured on the same held-out text
    loadtest    (when required) reports.load_test exists, says "passed": true, and meets the
                policy's limits on its "p95_ms", "error_rate" and "rps" fields
"""

from __future__ import annotations

import operator

import msgspec

from registry.manifest import Manifest, ParityReport


class GatePolicy(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    parity: bool = True  # require passed parity reports
    targets: list[str] | None = None  # targets whose parity is required; None: every artifact
    max_ppl_increase: float | None = 0.02  # relative perplexity increase allowed; None: no gate
    require_loadtest: bool = False  # require a load-test report that met its SLO
    loadtest_max_p95_ms: float | None = None  # limits on the load-test report's fields
    loadtest_max_error_rate: float | None = None
    loadtest_min_rps: float | None = None
    # limits on each required target's parity figures (exporters/parity.py); None: not checked
    parity_min_top1_agreement: float | None = None  # same top token as the reference, fraction
    parity_max_kl_mean: float | None = None  # mean KL(reference ‖ target), nats per token
    parity_max_kl_p99: float | None = None  # its 99th percentile
    parity_max_ppl_increase: float | None = None  # ppl_target / ppl_eager - 1


GatesConfig = dict[str, GatePolicy]  # alias (or "*") → policy


class GateResult(msgspec.Struct, kw_only=True):
    gate: str  # "parity", "fidelity", "perplexity", "loadtest"
    passed: bool
    detail: str  # what was compared, with the values and the limit


def policy_for(config: GatesConfig, alias: str) -> GatePolicy:
    return config.get(alias) or config.get("*") or GatePolicy()


def decode_config(data: bytes) -> GatesConfig:
    """Parses gates.json; raises ValueError naming the bad field."""
    try:
        return msgspec.json.decode(data, type=GatesConfig)
    except msgspec.DecodeError as e:
        raise ValueError(f"invalid gates config: {e}") from None


def check(candidate: Manifest, current: Manifest | None, policy: GatePolicy) -> list[GateResult]:
    """Every gate the policy enables, passed or not; `current` is the alias's version now."""
    results = []
    if policy.parity:
        results.append(_parity(candidate, policy.targets))
    if any(limit is not None for _, limit, _, _ in _fidelity_limits(policy)):
        results.append(_fidelity(candidate, policy))
    if policy.max_ppl_increase is not None:
        results.append(_perplexity(candidate, current, policy.max_ppl_increase))
    loadtest_limits = (
        policy.loadtest_max_p95_ms,
        policy.loadtest_max_error_rate,
        policy.loadtest_min_rps,
    )
    if policy.require_loadtest or any(x is not None for x in loadtest_limits):
        results.append(_loadtest(candidate, policy))
    return results


def _parity(m: Manifest, targets: list[str] | None) -> GateResult:
    wanted = targets if targets is not None else [a.target for a in m.artifacts]
    if not wanted:
        return GateResult(gate="parity", passed=False, detail="the package has no artifacts")
    problems = []
    for target in wanted:
        report = m.reports.parity.get(target)
        if report is None:
            problems.append(f"{target}: no parity report")
        elif not report.passed:
            problems.append(f"{target}: failed ({report.reason})")
        elif report.forced:
            problems.append(f"{target}: exported with --force")
    if problems:
        return GateResult(gate="parity", passed=False, detail="; ".join(problems))
    return GateResult(gate="parity", passed=True, detail=f"passed for {', '.join(wanted)}")


def _fidelity_limits(policy: GatePolicy) -> list[tuple]:
    """(report field, limit, check, how it reads) for each figure the policy may limit."""
    return [
        ("top1_agreement", policy.parity_min_top1_agreement, operator.ge, ">="),
        ("kl_mean", policy.parity_max_kl_mean, operator.le, "<="),
        ("kl_p99", policy.parity_max_kl_p99, operator.le, "<="),
        ("ppl_increase", policy.parity_max_ppl_increase, operator.le, "<="),
    ]


def _fidelity(m: Manifest, policy: GatePolicy) -> GateResult:
    wanted = policy.targets if policy.targets is not None else [a.target for a in m.artifacts]
    if not wanted:
        return GateResult(gate="fidelity", passed=False, detail="the package has no artifacts")
    problems, lines = [], []
    for target in wanted:
        report = m.reports.parity.get(target)
        if report is None:
            problems.append(f"{target}: no parity report")
            continue
        found = _fidelity_problems(report, policy)
        problems += [f"{target}: {p}" for p in found]
        if not found:
            lines.append(f"{target}: {_fidelity_figures(report, policy)}")
    if problems:
        return GateResult(gate="fidelity", passed=False, detail="; ".join(problems))
    return GateResult(gate="fidelity", passed=True, detail="; ".join(lines))


def _fidelity_problems(report: ParityReport, policy: GatePolicy) -> list[str]:
    problems = []
    for field, limit, ok, op in _fidelity_limits(policy):
        if limit is None:
            continue
        value = getattr(report, field)
        if not isinstance(value, int | float):  # a report older than the figure
            problems.append(f"{field} not measured (must be {op} {limit})")
        elif not ok(value, limit):
            problems.append(f"{field} {value:.4g} (must be {op} {limit})")
    return problems


def _fidelity_figures(report: ParityReport, policy: GatePolicy) -> str:
    return ", ".join(
        f"{field} {getattr(report, field):.4g} {op} {limit}"
        for field, limit, _, op in _fidelity_limits(policy)
        if limit is not None
    )


def _perplexities(m: Manifest) -> dict[str, float]:
    """Perplexities keyed by what they were measured on: only equal keys compare."""
    found = {}
    ev = m.reports.eval or {}
    if isinstance(ev.get("perplexity"), int | float):
        found[f"eval on {ev.get('dataset', 'its eval set')}"] = float(ev["perplexity"])
    for target, r in m.reports.parity.items():
        found[f"{target} on {r.held_out} ({r.held_out_tokens} tokens)"] = r.ppl_target
    return found


def _perplexity(candidate: Manifest, current: Manifest | None, margin: float) -> GateResult:
    mine = _perplexities(candidate)
    if current is None:
        return GateResult(gate="perplexity", passed=True, detail="the alias has no version yet")
    if not mine:
        return GateResult(
            gate="perplexity",
            passed=False,
            detail="the version reports no perplexity (reports.eval or parity)",
        )
    theirs = _perplexities(current)
    common = [k for k in mine if k in theirs]
    eval_keys = [k for k in common if k.startswith("eval on ")]
    compared = eval_keys or common  # the eval report, when both have one, is the one that counts
    if not compared:
        return GateResult(
            gate="perplexity",
            passed=False,
            detail="no perplexity measured on the same text as the current version",
        )
    worse, lines = [], []
    for key in compared:
        increase = mine[key] / theirs[key] - 1
        line = f"{key}: {mine[key]:.4g} vs {theirs[key]:.4g} ({increase:+.2%}, limit +{margin:.2%})"
        lines.append(line)
        if increase > margin:
            worse.append(line)
    return GateResult(gate="perplexity", passed=not worse, detail="; ".join(worse or lines))


def _loadtest(m: Manifest, policy: GatePolicy) -> GateResult:
    report = m.reports.load_test
    if not report:
        return GateResult(gate="loadtest", passed=False, detail="no load-test report")
    problems = [] if report.get("passed") is True else ["the report did not pass its SLO"]
    limits = [
        ("p95_ms", policy.loadtest_max_p95_ms, lambda v, lim: v <= lim, "<="),
        ("error_rate", policy.loadtest_max_error_rate, lambda v, lim: v <= lim, "<="),
        ("rps", policy.loadtest_min_rps, lambda v, lim: v >= lim, ">="),
    ]
    for field, limit, ok, op in limits:
        if limit is None:
            continue
        value = report.get(field)
        if not isinstance(value, int | float):
            problems.append(f"{field} missing from the report (must be {op} {limit})")
        elif not ok(value, limit):
            problems.append(f"{field} {value} (must be {op} {limit})")
    if problems:
        return GateResult(gate="loadtest", passed=False, detail="; ".join(problems))
    return GateResult(gate="loadtest", passed=True, detail="met its SLO")
