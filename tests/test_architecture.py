"""The layering of docs/architecture.md, checked: the import contracts in `.importlinter`, no
module import cycles, and no import inside a function unless it defers a heavy dependency.

These read the source only (grimp parses it; nothing is imported), so they take a second or two.
"""

from __future__ import annotations

import ast
import configparser
import re
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = (
    "aimass_common", "trainer", "registry", "engine", "exporters", "gateway", "controlplane", "worker"
)  # fmt: skip

# What a function may import lazily: dependencies that are heavy to import (torch, TensorRT, ONNX
# Runtime's quantization tools, matplotlib, uvicorn) or optional for most users (boto3 for S3,
# redis for shared limits). A deferred import of a project module is allowed when it defers one
# of these (a CLI that must not import torch for `--help`); its comment names which.
HEAVY = (
    "torch",
    "tensorrt",
    "onnxruntime",
    "onnx",
    "matplotlib",
    "uvicorn",
    "boto3",
    "redis",
    "transformers",
    "sqlalchemy",  # the control plane's ORM and migrations (~0.2 s): not for `aimass --help`
    "alembic",
    "argon2",
)


def test_import_contracts_hold():
    """`lint-imports` exits 0: every contract in .importlinter (the package table) is kept."""
    exe = Path(sys.executable).with_name("lint-imports")
    if not exe.exists():
        pytest.skip(
            f"lint-imports is not installed next to {sys.executable} (pip install -e '.[dev]')"
        )
    done = subprocess.run(
        [str(exe), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    broken = [ln for ln in done.stdout.splitlines() if "BROKEN" in ln or "->" in ln]
    assert done.returncode == 0, "import contracts broken:\n" + "\n".join(broken or [done.stdout])


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    for root in sorted(graph.modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in graph.modules:
                    continue
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append(
                        (child, iter(sorted(graph.find_modules_directly_imported_by(child))))
                    )
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_module_import_cycles():
    graph = grimp.build_graph(*PACKAGES, cache_dir=None, exclude_type_checking_imports=True)
    cycles = _cycles(graph)
    assert not cycles, "modules that import each other (directly or through others):\n" + "\n".join(
        " <-> ".join(c) for c in cycles
    )


def _function_imports(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    lines = path.read_text().splitlines()
    for fn in ast.walk(tree):
        if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for node in ast.walk(fn):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = (
                    [a.name for a in node.names]
                    if isinstance(node, ast.Import)
                    else [node.module or ""]
                )
                here = lines[node.lineno - 1]
                comment = here.split("#", 1)[1] if "#" in here else ""
                # the comment may stand above a run of deferred imports (blank lines between)
                above = node.lineno - 2
                while above >= 0 and (
                    not lines[above].strip()
                    or lines[above].strip().startswith(("import ", "from ", "#"))
                ):
                    if lines[above].strip().startswith("#"):
                        comment += lines[above]
                    above -= 1
                yield node.lineno, names, comment


def test_imports_inside_functions_only_defer_heavy_dependencies():
    """An import inside a function defers a heavy or optional dependency and its comment (on the
    line or the line above) says which; anything else belongs at the top of the module."""
    files = [ROOT / "aimass_cli.py"] + [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    bad = []
    for path in files:
        for lineno, names, comment in _function_imports(path):
            top = {n.split(".")[0] for n in names}
            external = top - set(PACKAGES) - {"aimass_cli"}
            heavy_named = any(h in comment for h in HEAVY)
            if external and not external <= set(HEAVY):
                bad.append(
                    f"{path.relative_to(ROOT)}:{lineno} imports {names}: not a heavy dependency"
                )
            elif not heavy_named:
                bad.append(
                    f"{path.relative_to(ROOT)}:{lineno} imports {names} in a function without a "
                    f"comment naming the heavy dependency it defers"
                )
    assert not bad, "\n".join(bad)


def _contracts() -> dict[str, dict[str, list[str]]]:
    config = configparser.ConfigParser()
    config.read(ROOT / ".importlinter")
    contracts = {}
    for section in config.sections():
        if section.startswith("importlinter:contract:"):
            fields = config[section]
            contracts[section.split(":")[-1]] = {
                key: [v.strip() for v in fields[key].splitlines() if v.strip()] for key in fields
            }
    return contracts


def _doc_rows(heading: str) -> list[list[str]]:
    """The body rows of the first table under `## heading` in docs/architecture.md."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = [ln for ln in section.splitlines() if ln.startswith("|")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[2:]]


def test_the_package_table_is_the_contracts():
    """docs/architecture.md's "may import" column is what the layers and forbidden contracts
    allow: every package below in the layers, less what a forbidden contract takes away."""
    contracts = _contracts()
    layers = [[m.strip() for m in layer.split("|")] for layer in contracts["packages"]["layers"]]
    allowed = {
        pkg: {p for lower in layers[i + 1 :] for p in lower}
        for i, layer in enumerate(layers)
        for pkg in layer
    }
    for contract in contracts.values():
        if contract["type"] == ["forbidden"]:
            for source in contract["source_modules"]:
                if source in allowed:
                    allowed[source] -= set(contract["forbidden_modules"])
    documented = {}
    for name, _owns, may_import in _doc_rows("Packages"):
        pkg = name.strip("`/")
        if pkg in allowed:
            said = re.sub(r"\([^)]*\)", "", may_import.split("Never")[0])
            documented[pkg] = {w for w in re.findall(r"[a-z_]+", said) if w in allowed}
    assert documented == allowed


def test_the_gateway_table_is_the_contract():
    layers = [
        {m.strip() for m in layer.split("|")}
        for layer in _contracts()["gateway-features"]["layers"]
    ]
    documented = [
        set(re.findall(r"`([a-z_.]+)`", modules))
        for _n, modules, _what in _doc_rows("Inside the gateway")
    ]
    assert documented == layers
