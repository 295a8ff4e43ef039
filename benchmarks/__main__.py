"""`python -m benchmarks all`: every committed result (benchmarks/catalog.py) rerun at one commit, one entry after the
other (each script interleaves its own configs), then the results index; `python -m benchmarks index`: the index only.

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks all --list                    # the catalog, with costs
    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks all --smoke                   # every entry on the tiny model
    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks all --out benchmarks/results  # hours: replaces the committed ones
    .venv/bin/python -m benchmarks index                                          # rewrites benchmarks/results/INDEX.md
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import catalog, report
from benchmarks.data import REPO_ROOT


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command")
    run = commands.add_parser("all", help="rerun the catalog's entries, then write the index")
    run.add_argument("--only", default="", help="comma-separated entry names (default: every entry)")
    run.add_argument("--smoke", action="store_true", help="each entry's --smoke mode (tiny random model, seconds)")
    run.add_argument("--list", action="store_true", help="print the catalog with the cost of each entry and stop")
    run.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results folder, laid out as benchmarks/results is (default: a new benchmarks/runs/all-<time>, never "
        "the committed folder; pass --out benchmarks/results to replace those)",
    )
    index = commands.add_parser("index", help="(re)write DIR/INDEX.md from the metadata of DIR's results")
    index.add_argument("dir", nargs="?", type=Path, default=report.RESULTS_DIR)
    return parser


def select(parser: argparse.ArgumentParser, only: str) -> list[catalog.Entry]:
    names = [name.strip() for name in only.split(",") if name.strip()]
    unknown = [name for name in names if name not in catalog.BY_NAME]
    if unknown:
        parser.error(f"unknown entries {', '.join(unknown)}; known: {', '.join(catalog.BY_NAME)}")
    return [catalog.BY_NAME[name] for name in names] if names else list(catalog.CATALOG)


def shell(entry: catalog.Entry) -> str:
    """How a person would type the entry's command (without --out)."""
    env = " ".join(f"{key}={value}" for key, value in entry.env)
    return " ".join(part for part in (env, "python -m", entry.script, entry.args) if part)


def print_catalog(entries: list[catalog.Entry]) -> None:
    width = max(len(entry.name) for entry in entries)
    for entry in entries:
        smoke = "" if entry.smoke else "  [no --smoke]"
        print(f"{entry.name:<{width}}  {entry.minutes:>3} min  {shell(entry)}{smoke}")
    total = sum(entry.minutes for entry in entries)
    print(f"{len(entries)} entries, about {total / 60:.1f} h in all (the committed runs' wall time on 2 shared cores)")


def check_arguments(entries: list[catalog.Entry]) -> list[str]:
    """Names of the entries whose arguments their script's parser refuses: checked before hours of runs start."""
    refused = []
    for entry in entries:
        try:
            catalog.parse(entry)
        except SystemExit:
            refused.append(entry.name)
    return refused


def run_all(entries: list[catalog.Entry], out: Path, smoke: bool) -> int:
    """Run the entries one after the other into `out`, then write its index; the exit status counts the failures."""
    failed = []
    for number, entry in enumerate(entries, 1):
        if smoke and not entry.smoke:
            print(f"[{number}/{len(entries)}] {entry.name}: skipped (its script has no --smoke mode)", flush=True)
            continue
        command = entry.command(out, smoke)
        print(f"[{number}/{len(entries)}] {entry.name} (~{entry.minutes} min full): {' '.join(command)}", flush=True)
        started = time.monotonic()
        done = subprocess.run(command, cwd=REPO_ROOT, env={**os.environ, **dict(entry.env)}, check=False)
        print(f"[{number}/{len(entries)}] {entry.name}: exit {done.returncode}, {time.monotonic() - started:.0f} s")
        if done.returncode:
            failed.append(entry.name)
    print(f"index: {catalog.write_index(out)}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return len(failed)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "index":
        print(catalog.write_index(args.dir))
        return 0
    if args.command != "all":
        parser.print_help()
        return 0
    entries = select(parser, args.only)
    if args.list:
        print_catalog(entries)
        return 0
    out = args.out or report.fresh_run_dir("all", args.smoke)
    if args.smoke and out.resolve() == report.RESULTS_DIR.resolve():
        parser.error("smoke results never go into the committed benchmarks/results")
    refused = check_arguments(entries)
    if refused:
        parser.error(f"the catalog's arguments no longer parse for: {', '.join(refused)} (see above)")
    out.mkdir(parents=True, exist_ok=True)
    return run_all(entries, out, args.smoke)


if __name__ == "__main__":
    sys.exit(main())
