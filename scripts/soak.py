"""Soak: one session chats for `--tokens` generated tokens across many turns against a live server; reports whether
TPOT and the server's RSS stay flat (mean of the last 10% of turns over the first 10%) and counts errors.

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/soak.py --tokens 50000            # starts python -m app (SmolLM2)
    .venv/bin/python scripts/soak.py --url http://127.0.0.1:8000 --pid 1234     # an already running server

A started server persists to a temporary snapshot directory, so snapshot writes are part of what is measured.
Only 127.0.0.1 is ever contacted by the started server; the run stops after `--tokens` or `--max-minutes`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

from benchmarks.report import run_meta, run_start

PROMPTS = (
    "Tell me a story about a lighthouse keeper.",
    "Go on, what happened next?",
    "Describe the weather that night.",
    "Who else lived on the island?",
    "Continue the story.",
)


def start_server(model: str, snapshot_dir: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "H2O_MODEL": model,
        "H2O_PORT": str(port),
        "H2O_SNAPSHOT_DIR": snapshot_dir,
        "H2O_LOG_LEVEL": "warning",
        "H2O_MAX_NEW_TOKENS": "4096",
    }
    proc = subprocess.Popen([sys.executable, "-m", "app"], cwd=Path(__file__).resolve().parents[1], env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("server not ready after 300 s")


def ratio(values: list[float]) -> float:
    """Mean of the last 10% over the mean of the first 10% (at least one value each)."""
    n = max(1, len(values) // 10)
    return statistics.fmean(values[-n:]) / statistics.fmean(values[:n])


def soak(url: str, pid: int | None, tokens: int, per_turn: int, max_minutes: float, api_key: str | None) -> dict:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    process = psutil.Process(pid) if pid else None
    turns, errors, generated = [], [], 0
    deadline = time.monotonic() + max_minutes * 60
    with httpx.Client(base_url=url, timeout=600, headers=headers) as client:
        while generated < tokens and time.monotonic() < deadline:
            body = {
                "message": PROMPTS[len(turns) % len(PROMPTS)],
                "stream": False,
                "temperature": 0.7,
                "seed": len(turns),
                "max_new_tokens": per_turn,
                "min_new_tokens": per_turn,
            }
            response = client.post("/sessions/soak/generate", json=body)
            if response.status_code != 200:
                errors.append({"turn": len(turns), "status": response.status_code, "body": response.text[:300]})
                continue
            result = response.json()
            generated += result["usage"]["completion_tokens"]
            turns.append(
                {
                    "generated": generated,
                    "tpot_s": result["tpot_s"],
                    "ttft_s": result["ttft_s"],
                    "cache_tokens": result["cache_tokens"],
                    "cache_tokens_seen": result["cache_tokens_seen"],
                    "rss_bytes": process.memory_info().rss if process else None,
                }
            )
            print(
                f"turn {len(turns)}: {generated} tokens, tpot {result['tpot_s'] * 1e3:.1f} ms, cache "
                f"{result['cache_tokens']}/{result['cache_tokens_seen']}",
                file=sys.stderr,
            )
    summary = {
        "tokens": generated,
        "turns": len(turns),
        "errors": len(errors),
        "error_samples": errors[:5],
        "tpot_ratio_last_over_first_10pct": ratio([t["tpot_s"] for t in turns]) if turns else None,
        "max_cache_tokens": max((t["cache_tokens"] for t in turns), default=0),
    }
    if process is not None and turns:
        summary["rss_ratio_last_over_first_10pct"] = ratio([t["rss_bytes"] for t in turns])
        summary["rss_first_last_mib"] = [turns[0]["rss_bytes"] / 2**20, turns[-1]["rss_bytes"] / 2**20]
    return {"summary": summary, "turns": turns}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=50_000, help="tokens to generate in all")
    parser.add_argument("--per-turn", type=int, default=256, help="tokens per turn (forced: min = max)")
    parser.add_argument("--url", help="a running server (default: start python -m app)")
    parser.add_argument("--pid", type=int, help="with --url: the server's pid, to sample its RSS")
    parser.add_argument("--model", default="smollm2", help="H2O_MODEL of a started server")
    parser.add_argument("--api-key", default=os.environ.get("H2O_API_KEY"))
    parser.add_argument("--max-minutes", type=float, default=600.0, help="stop after this long regardless")
    parser.add_argument("--out", type=Path, help="write the per-turn records and the summary as JSON")
    args = parser.parse_args()

    start = run_start()
    proc = None
    with tempfile.TemporaryDirectory(prefix="h2o-soak-") as snapshot_dir:
        try:
            if args.url:
                url, pid = args.url, args.pid
            else:
                proc, url = start_server(args.model, snapshot_dir)
                pid = proc.pid
            report = soak(url, pid, args.tokens, args.per_turn, args.max_minutes, args.api_key)
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(60)
    report["meta"] = {
        **run_meta(start, "scripts.soak"),
        "model": args.model if not args.url else f"the server at {args.url}",
        "device": "the server's",
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "text_sha256": {"PROMPTS": hashlib.sha256("\n".join(PROMPTS).encode()).hexdigest()},
    }
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report["summary"], indent=1))


if __name__ == "__main__":
    main()
