"""`aimass registry push|ls|show|pull|alias|promote|rollback|events|gc|gates|report|reports`.

The registry is `--registry URI` (a folder, file:///path, or s3://bucket/prefix), else
$AIMASS_REGISTRY, else $AIMASS_HOME/registry (AIMASS_HOME defaults to ~/.aimass). Events name
the user from $AIMASS_USER, else the OS user. Results go to stdout, notes to stderr, and an
error is one line on stderr with its exit code:

    0 done   1 storage failed   2 bad input / not found   3 alias or report moved (lost race)
    4 a promotion gate failed   5 sha256 mismatch
"""

from __future__ import annotations

import argparse
import re
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import msgspec

from aimass_common.cli import fail
from aimass_common.settings import default_registry
from registry import errors, gates
from registry.cache import pull
from registry.manifest import ManifestError, decode
from registry.names import parse_ref, parse_version
from registry.registry import Registry


def register(subparsers) -> None:
    p = subparsers.add_parser("registry", help="model registry: versions, aliases, promotion")
    where = "a folder, file:///path or s3://bucket/prefix (default $AIMASS_REGISTRY, else "
    where += "$AIMASS_HOME/registry)"
    p.add_argument("--registry", metavar="URI", help=where)
    common = argparse.ArgumentParser(add_help=False)  # --registry also after the subcommand
    common.add_argument("--registry", metavar="URI", default=argparse.SUPPRESS, help=where)
    sub = p.add_subparsers(dest="registry_command", metavar="COMMAND", required=True)

    def add(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], help=help)

    c = add("push", "store a package folder as the next version; prints its number")
    c.add_argument("package", metavar="PKG", help="a model package folder (with manifest.json)")
    c.add_argument("--name", required=True, help="the model's name in the registry")
    c = add("ls", "list models, or the versions of one")
    c.add_argument("name", nargs="?")
    c.add_argument("--json", action="store_true")
    c = add("show", "a version's manifest: NAME (latest), NAME:VERSION or NAME@ALIAS")
    c.add_argument("ref", metavar="REF")
    c.add_argument("--json", action="store_true", help="the manifest as stored")
    c = add("pull", "fetch a version into the local cache, verified; prints its folder")
    c.add_argument("ref", metavar="REF", help="NAME, NAME:VERSION or NAME@ALIAS")
    c.add_argument("--to", metavar="DIR", help="also copy the package to DIR (new or empty)")
    c.add_argument("--verify", action="store_true", help="hash the cached files again")
    c.add_argument("--cache", metavar="DIR", help="cache folder (default $AIMASS_HOME/cache)")
    c = add("alias", "point ALIAS at VERSION by compare-and-swap (exit 3 if it moved)")
    c.add_argument("name")
    c.add_argument("alias")
    c.add_argument("version")
    c.add_argument("--expect", metavar="VERSION", help="the version it must point to now, or none")
    c.add_argument(
        "--weight",
        type=float,
        metavar="W",
        help="make ALIAS a canary: the gateway sends this share (0..1) of NAME's traffic to it",
    )
    c = add("promote", "move ALIAS to VERSION if the gates pass (exit 4 naming the failed gate)")
    c.add_argument("name")
    c.add_argument("version")
    c.add_argument("--to", dest="alias", required=True, metavar="ALIAS")
    c.add_argument("--force", action="store_true", help="promote despite failed gates (recorded)")
    c.add_argument("--require-loadtest", action="store_true", help="also require a load test")
    c.add_argument("--max-ppl-increase", type=float, metavar="FRACTION", help="e.g. 0.02")
    c = add("rollback", "move ALIAS back to its previous target")
    c.add_argument("name")
    c.add_argument("alias")
    c = add("events", "the audit log of a model")
    c.add_argument("name")
    c.add_argument("--json", action="store_true")
    c = add("gc", "delete unaliased versions past a retention, and unreferenced blobs")
    c.add_argument("--older-than", default="7d", metavar="AGE", help="e.g. 7d, 12h, 0 (default 7d)")
    c.add_argument("--dry-run", action="store_true", help="list what would go; delete nothing")
    c = add("gates", "show the promotion gates config, or --set it from a JSON file")
    c.add_argument("--set", dest="file", metavar="FILE")
    c = add("report", "attach a report (eval, load_test, canary, ...) to a version, or replace it")
    c.add_argument("ref", metavar="NAME:VERSION")
    c.add_argument("kind", metavar="KIND", help="eval, load_test, benchmark, canary, pipeline, ...")
    c.add_argument("file", metavar="FILE.json", help="a JSON object; '-' reads stdin")
    c.add_argument("--new", action="store_true", help="refuse (exit 3) if one is there already")
    c = add("reports", "the reports attached to a version since its push")
    c.add_argument("ref", metavar="REF", help="NAME, NAME:VERSION or NAME@ALIAS")
    c.add_argument("--json", action="store_true", help="{kind: report}")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    codes = {  # the one table of exit codes; any other RegistryError is bad input (2)
        errors.StorageError: 1,
        errors.AliasConflict: 3,
        errors.GateFailed: 4,
        errors.IntegrityError: 5,
    }
    uri = args.registry or default_registry()
    try:
        registry = Registry.open(uri)
        return HANDLERS[args.registry_command](registry, args)
    except (errors.RegistryError, ManifestError) as e:
        return fail(str(e), next((c for t, c in codes.items() if isinstance(e, t)), 2))
    except BrokenPipeError:  # `... | head`: the reader left; not an error of the registry
        raise
    except OSError as e:  # the local disk: a full cache, permissions, a missing file
        return fail(str(e), 1)


def _push(reg, args) -> int:
    result = reg.push(args.package, args.name)
    for path in result.unlisted:
        print(f"note: {path} is not listed in the manifest and was not stored", file=sys.stderr)
    print(
        f"pushed {result.name}:{result.version} ({_mb(result.uploaded_bytes)} uploaded, "
        f"{_mb(result.reused_bytes)} already stored)",
        file=sys.stderr,
    )
    print(result.version)
    return 0


def _ls(reg, args) -> int:
    if args.name:
        aliases = reg.aliases(args.name)
        rows = [
            {
                "version": v.version,
                "pushed_at": v.pushed_at.isoformat(timespec="seconds"),
                "aliases": sorted(a for a, r in aliases.items() if r.version == v.version),
            }
            for v in reg.versions(args.name)
        ]
        if not rows:
            return fail(f"no model named {args.name!r} in {reg.store.uri}")
        lines = [f"{r['version']:>7}  {r['pushed_at']}  {' '.join(r['aliases'])}" for r in rows]
    else:
        rows = []
        for name in reg.models():
            versions = reg.versions(name)
            aliases = {a: r.version for a, r in reg.aliases(name).items()}
            latest = versions[-1].version if versions else None
            rows.append(
                {"name": name, "versions": len(versions), "latest": latest, "aliases": aliases}
            )
        lines = [
            f"{r['name']}  {r['versions']} versions, latest {r['latest']}  "
            + " ".join(f"{a}={v}" for a, v in r["aliases"].items())
            for r in rows
        ]
    print(msgspec.json.encode(rows).decode() if args.json else "\n".join(lines))
    return 0


def _show(reg, args) -> int:
    name, version = reg.resolve(args.ref)
    data = reg.manifest_bytes(name, version)
    if args.json:
        sys.stdout.write(data.decode())
        return 0
    m = decode(data)
    aliases = [a for a, r in reg.aliases(name).items() if r.version == version]
    print(f"{name}:{version}" + (f"  ({', '.join('@' + a for a in aliases)})" if aliases else ""))
    print(f"  model        {m.model.architecture}, {m.model.n_layers} layers, dim {m.model.dim}")
    print(f"  max context  {m.max_context}")
    print(f"  created      {m.created_at.isoformat(timespec='seconds')}")
    for a in m.artifacts:
        size = sum(f.size for f in a.files)
        parity = m.reports.parity.get(a.target)
        state = (
            "no parity report"
            if parity is None
            else ("parity passed" if parity.passed else "parity FAILED")
        )
        print(f"  {a.target:<14} {a.runtime}, {a.dtype}, {_mb(size)}, {state}")
    print(f"  files        {len(m.files())}, {_mb(sum(f.size for f in m.files()))}")
    if attached := reg.reports(name, version):
        print(f"  attached     {', '.join(attached)} (aimass registry reports {name}:{version})")
    return 0


def _pull(reg, args) -> int:
    print(pull(reg, args.ref, cache_dir=args.cache, to=args.to, verify=args.verify))
    return 0


def _print_move(move) -> None:
    where = f"{move.name}@{move.alias}"
    if move.changed:
        print(f"{where}: {move.from_version or 'none'} -> {move.version}")
    else:
        print(f"{where}: already {move.version}")


def _alias(reg, args) -> int:
    expect = None
    if args.expect is not None:
        expect = 0 if args.expect.lower() == "none" else parse_version(args.expect)
    version = parse_version(args.version)
    _print_move(reg.set_alias(args.name, args.alias, version, expect=expect, weight=args.weight))
    return 0


def _promote(reg, args) -> int:
    policy = gates.policy_for(reg.gates_config(), args.alias)
    if args.require_loadtest:
        policy = msgspec.structs.replace(policy, require_loadtest=True)
    if args.max_ppl_increase is not None:
        policy = msgspec.structs.replace(policy, max_ppl_increase=args.max_ppl_increase)
    move = reg.promote(
        args.name, parse_version(args.version), args.alias, force=args.force, policy=policy
    )
    for r in move.gates:
        state = "passed" if r.passed else "FAILED (forced)"
        print(f"gate {r.gate}: {state}: {r.detail}", file=sys.stderr)
    _print_move(move)
    return 0


def _rollback(reg, args) -> int:
    _print_move(reg.rollback(args.name, args.alias))
    return 0


def _events(reg, args) -> int:
    events = reg.events(args.name)
    if args.json:
        print(msgspec.json.encode(events).decode())
        return 0
    for e in events:
        what = f"{e.name}:{e.version}" if e.version else e.name
        if e.alias:
            what = f"{e.name}@{e.alias} {e.from_version or 'none'} -> {e.version}"
        flags = " forced" if e.forced else ""
        gates = ", ".join(f"{g.gate} {'ok' if g.passed else 'FAILED'}" for g in e.gates)
        extra = "  ".join(x for x in (gates, e.detail) if x)
        print(f"{e.at.isoformat(timespec='seconds')}  {e.who}  {e.action}{flags}  {what}  {extra}")
    return 0


def _gc(reg, args) -> int:
    report = reg.gc(parse_age(args.older_than), dry_run=args.dry_run)
    verb = "would delete" if args.dry_run else "deleted"
    for v in report.versions:
        print(f"{verb} version {v}", file=sys.stderr)
    for other in report.other:
        print(f"{verb} {other}", file=sys.stderr)
    print(f"{verb} {len(report.versions)} versions, {len(report.blobs)} blobs")
    return 0


def _gates(reg, args) -> int:
    if args.file:
        reg.set_gates_config(Path(args.file).read_bytes())
    config = reg.gates_config()
    if not config:
        print("no config/gates.json: every alias uses the default policy", file=sys.stderr)
    print(msgspec.json.format(msgspec.json.encode(config), indent=2).decode())
    return 0


def _report(reg, args) -> int:
    ref = parse_ref(args.ref)
    if ref.version is None:
        raise errors.RegistryError(f"{args.ref!r}: name the version, as NAME:VERSION")
    try:
        data = sys.stdin.buffer.read() if args.file == "-" else Path(args.file).read_bytes()
    except (FileNotFoundError, IsADirectoryError):
        raise errors.RegistryError(f"{args.file}: no such file") from None
    try:
        report = msgspec.json.decode(data, type=dict[str, Any])
    except msgspec.DecodeError as e:
        raise errors.RegistryError(f"{args.file} is not a JSON object: {e}") from None
    reg.attach_report(ref.name, ref.version, args.kind, report, expect_absent=args.new)
    print(f"attached the {args.kind} report to {ref.name}:{ref.version}")
    return 0


def _reports(reg, args) -> int:
    name, version = reg.resolve(args.ref)
    reports = reg.reports(name, version)
    if args.json:
        print(msgspec.json.encode(reports, order="deterministic").decode())
        return 0
    if not reports:
        print(f"{name}:{version} has no attached reports", file=sys.stderr)
    for kind, report in reports.items():
        text = msgspec.json.encode(report, order="deterministic").decode()
        print(f"{kind:<10} {text if len(text) <= 100 else text[:97] + '...'}")
    return 0


def parse_age(text: str) -> timedelta:
    """'7d', '12h', '30m', '45s', '2w' or '0'."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smhdw]?)", text.strip())
    if not match or (not match.group(2) and float(match.group(1)) != 0):
        raise errors.RegistryError(
            f"--older-than {text!r}: give a number and a unit: 7d, 12h, 30m, 0"
        )
    unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks", "": "days"}
    return timedelta(**{unit[match.group(2)]: float(match.group(1))})


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


HANDLERS = {
    "push": _push,
    "ls": _ls,
    "show": _show,
    "pull": _pull,
    "alias": _alias,
    "promote": _promote,
    "rollback": _rollback,
    "events": _events,
    "gc": _gc,
    "gates": _gates,
    "report": _report,
    "reports": _reports,
}
