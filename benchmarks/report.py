"""Writing results (Markdown tables, JSON, PNG line plots) and the command-line options every script shares."""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.data import REPO_ROOT, text_checksums
from benchmarks.runner import SMOKE_MODEL

RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
"""The committed results; written only when --out names it."""
RUNS_DIR = REPO_ROOT / "benchmarks" / "runs"


def common_args(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", default="smollm2", help="'smollm2' (bundled), an HF id or a local path")
    parser.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")
    parser.add_argument("--dtype", default=None, help="float32 / float16 / bfloat16 (default: fp32 CPU, fp16 CUDA)")
    parser.add_argument("--data-dir", default=None, help="folder with the texts (default ../shared/data from the repo)")
    parser.add_argument(
        "--out",
        default=None,
        help="output folder (default: a new benchmarks/runs/<script>-<time>, never the committed "
        "benchmarks/results; pass --out benchmarks/results to update those)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per worker (1: on a shared 2-core box more threads only add stalls)",
    )
    parser.add_argument("--inline", action="store_true", help="run every config in this process (no workers)")
    parser.add_argument("--smoke", action="store_true", help="tiny random model, few tokens: checks the plumbing")
    return parser


def out_dir(args) -> Path:
    """--out, or a fresh folder under benchmarks/runs (ignored by git), so that a run never overwrites the committed
    results by accident."""
    path = Path(args.out) if args.out else fresh_run_dir(Path(sys.argv[0]).stem, args.smoke)
    path.mkdir(parents=True, exist_ok=True)
    return path


def fresh_run_dir(name: str, smoke: bool) -> Path:
    """A new folder under benchmarks/runs, named after the command and the time (not created here)."""
    return RUNS_DIR / f"{name}{'-smoke' if smoke else ''}-{time.strftime('%Y%m%d-%H%M%S')}"


def apply_smoke(args) -> None:
    if args.smoke:
        args.model, args.inline = SMOKE_MODEL, True


def _git(*cmd) -> str:
    try:
        return subprocess.run(["git", *cmd], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def run_start() -> dict:
    """Call when a run starts: its clock and the library version it loads (the tree may change during a long run)."""
    return {
        "started": time.time(),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty_library": bool(_git("status", "--porcelain", "--", "h2o_cache")),
    }


def meta(args, start: dict) -> dict:
    """Where and how a benchmark's result was produced (`start` from `run_start`)."""
    return {
        **run_meta(start, f"benchmarks.{Path(sys.argv[0]).stem}"),
        "model": args.model,
        "device": args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
        "threads_per_worker": args.threads,
        "text_sha256": {} if args.smoke else text_checksums(args.data_dir),
    }


def run_meta(start: dict, module: str) -> dict:
    """The command (as ``python -m <module> ...``), commit, machine and wall time of a run of any script."""
    return {
        "command": " ".join([Path(sys.executable).name, "-m", module, *sys.argv[1:]]),
        "git_commit": start["git_commit"],
        "git_dirty_library": start["git_dirty_library"],
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "wall_s": round(time.time() - start["started"], 1),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def median(values) -> float:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else float("nan")


def fmt(value, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(columns: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(fmt(v) if not isinstance(v, str) else v for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=1, default=float) + "\n")


def line_plot(
    path: Path,
    series: dict[str, tuple[list, list]],
    xlabel: str,
    ylabel: str,
    title: str,
    logy: bool = False,
    vline: float | None = None,
) -> None:
    """One line per config: ``series[label] = (xs, ys)``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker=".", label=label)
    if vline is not None:
        ax.axvline(vline, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
