"""Run the locust load headless, bounded in users and time, against a loopback server; write the CSV and a summary.

    python -m loadtest.run --serve --prometheus --users 4 --run-time 60 --out loadtest/results/smollm2

``--host URL`` targets a running server (loopback only). ``--serve`` starts ``python -m app`` itself on a free port,
configured by the ``H2O_*`` variables of the environment. ``--prometheus`` also starts the real Prometheus on the
repo's config (target and scrape interval replaced) and, after the load, evaluates every query of the Grafana
dashboard over the load window. Writes locust's CSVs (``locust_stats_history.csv``: the run second by second) and
final stats (``locust_final.json``), ``summary.json`` and ``summary.md`` to ``--out``; exits 1 when a request failed
or a dashboard query returned no data.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.parse
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

from loadtest import dashboard
from loadtest.stack import REPO, run_prometheus, serve

LOCUSTFILE = REPO / "loadtest" / "locustfile.py"
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}
LATENCY_TYPES = ("TTFT", "TPOT")
STOP_TIMEOUT_S = 60


def check_loopback(host: str) -> None:
    hostname = urllib.parse.urlsplit(host).hostname
    if hostname not in LOOPBACK_HOSTS:
        raise ValueError(f"load tests only target loopback; got host {host!r}")


def run_locust(
    host: str,
    out_dir: Path,
    users: int,
    spawn_rate: float,
    run_time_s: int,
    max_new_tokens: int,
    turns: int,
    user_classes: list[str],
) -> tuple[int, float]:
    """Run locust headless until `run_time_s` has passed and running replies have finished; return its exit code
    (1 when a request failed or the locustfile raised) and wall time."""
    cmd = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "--host",
        host,
        "--users",
        str(users),
        "--spawn-rate",
        str(spawn_rate),
        "--run-time",
        f"{run_time_s}s",
        "--stop-timeout",
        str(STOP_TIMEOUT_S),
        "--csv",
        str(out_dir / "locust"),
        "--json-file",
        str(out_dir / "locust_final"),
        "--only-summary",
        "--loglevel",
        "WARNING",
        *user_classes,
    ]
    env = {"LOCUST_MAX_NEW_TOKENS": str(max_new_tokens), "LOCUST_TURNS": str(turns)}
    start = time.monotonic()
    with open(out_dir / "locust.log", "wb") as log:
        result = subprocess.run(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            check=False,
            env={**os.environ, **env},
            timeout=run_time_s + STOP_TIMEOUT_S + 60,
        )
    return result.returncode, time.monotonic() - start


def percentile_ms(response_times: dict[float, int], fraction: float) -> float | None:
    """Locust's percentile over its histogram of (rounded) response times: the largest time with at most
    ``int(n * fraction)`` samples below it."""
    total = sum(response_times.values())
    if total == 0:
        return None
    below, allowed = total, int(total * fraction)
    for time_ms in sorted(response_times, reverse=True):
        below -= response_times[time_ms]
        if below <= allowed:
            return time_ms
    return min(response_times)


def _percentiles(response_times: dict[float, int]) -> dict:
    return {
        "p50": percentile_ms(response_times, 0.5),
        "p95": percentile_ms(response_times, 0.95),
        "p99": percentile_ms(response_times, 0.99),
        "samples": sum(response_times.values()),
    }


def summarize(final_json: Path) -> dict:
    """Requests (streamed replies: the POSTs), failures and percentiles (ms) per endpoint and over all endpoints,
    from locust's final stats
    (``--json-file``; the ``*_stats.csv`` is a snapshot locust writes once a second and can miss the last
    replies). Locust keeps times above 100 ms to 2 significant digits."""
    endpoints: dict[str, dict] = {}
    merged: dict[str, Counter] = {kind: Counter() for kind in LATENCY_TYPES}
    for entry in json.loads(final_json.read_text()):
        times = {float(t): n for t, n in entry["response_times"].items()}
        summary = endpoints.setdefault(entry["name"], {})
        if entry["method"] in LATENCY_TYPES:
            summary[f"{entry['method'].lower()}_ms"] = _percentiles(times)
            merged[entry["method"]].update(times)
        else:
            summary.update(
                method=entry["method"],
                requests=entry["num_requests"],
                failures=entry["num_failures"],
                latency_ms=_percentiles(times),
            )
    return {
        "requests": sum(e.get("requests", 0) for e in endpoints.values()),
        "replies": sum(e["requests"] for e in endpoints.values() if e.get("method") == "POST"),
        "failures": sum(e.get("failures", 0) for e in endpoints.values()),
        "ttft_ms": _percentiles(merged["TTFT"]),
        "tpot_ms": _percentiles(merged["TPOT"]),
        "endpoints": endpoints,
    }


def load_run(
    out_dir: Path,
    *,
    host: str | None = None,
    serve_env: dict[str, str] | None = None,
    prometheus: bool = False,
    users: int = 3,
    spawn_rate: float | None = None,
    run_time_s: int = 30,
    max_new_tokens: int = 32,
    turns: int = 6,
    user_classes: list[str] | None = None,
    scrape_interval_s: float = 1.0,
    rate_interval: str = "15s",
) -> dict:
    """One bounded load run; with `serve_env` (may be empty) the server is started here, else `host` must be up."""
    if (host is None) == (serve_env is None):
        raise ValueError("give exactly one of host (a running server) or serve_env (start one)")
    out_dir.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        if serve_env is not None:
            host = stack.enter_context(serve(out_dir / "server.log", serve_env))
        check_loopback(host)
        prometheus_url = None
        if prometheus:
            target = urllib.parse.urlsplit(host).netloc
            prometheus_url = stack.enter_context(
                run_prometheus(target, out_dir / "prometheus", f"{scrape_interval_s:g}s")
            )
            _wait_first_scrape(prometheus_url, timeout_s=10 + 5 * scrape_interval_s)
        start, load_before = time.time(), os.getloadavg()[0]
        exit_code, duration_s = run_locust(
            host, out_dir, users, spawn_rate or users, run_time_s, max_new_tokens, turns, user_classes or []
        )
        summary = {
            "host": host,
            "users": users,
            "run_time_s": run_time_s,
            "duration_s": round(duration_s, 1),
            "max_new_tokens": max_new_tokens,
            "turns_per_session": turns,
            "locust_exit_code": exit_code,
            # The CPU is shared: the 1-minute load average says how much else ran beside the load.
            "cpu_count": os.cpu_count(),
            "load_avg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
            **summarize(out_dir / "locust_final.json"),
        }
        if prometheus_url:
            # Two more scrapes, so the last requests are in Prometheus before it is asked.
            time.sleep(2 * scrape_interval_s + 0.5)
            end = time.time()
            results = dashboard.evaluate(prometheus_url, start, end, rate_interval)
            summary["rate_interval"] = rate_interval
            summary["dashboard"] = [
                {
                    "panel": r.query.panel,
                    "ref_id": r.query.ref_id,
                    "promql": r.promql,
                    "series": r.n_series,
                    "finite_points": r.n_finite_points,
                    "last": r.last_values,
                    "has_data": r.has_data,
                }
                for r in results
            ]
            total = dashboard.instant(prometheus_url, "sum(h2o_requests_total)", end)
            summary["server_requests_total"] = float(total[0]["value"][1]) if total else None
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    (out_dir / "summary.md").write_text(render(summary))
    return summary


def _wait_first_scrape(prometheus_url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        up = dashboard.instant(prometheus_url, "up", time.time())
        if up and up[0]["value"][1] == "1":
            return
        time.sleep(0.5)
    raise TimeoutError(f"Prometheus did not scrape the server within {timeout_s:.0f} s")


def _fmt(percentiles: dict | None) -> str:
    if not percentiles:
        return "-"
    return " / ".join("-" if percentiles[p] is None else f"{percentiles[p]:g}" for p in ("p50", "p95"))


def render(summary: dict) -> str:
    lines = [
        f"Load run against {summary['host']}: {summary['users']} users, {summary['run_time_s']} s of load "
        f"({summary['duration_s']} s wall, running replies let finish), max_new_tokens={summary['max_new_tokens']}, "
        f"{summary['turns_per_session']} turns per session. Machine: {summary['cpu_count']} CPUs, 1-min load "
        f"average {summary['load_avg_1m'][0]} before, {summary['load_avg_1m'][1]} after.",
        "",
        f"Requests: {summary['requests']} ({summary['replies']} streamed replies, the rest session deletes), "
        f"failures: {summary['failures']}, locust exit code: "
        f"{summary['locust_exit_code']}. TTFT p50 / p95: {_fmt(summary['ttft_ms'])} ms; "
        f"TPOT p50 / p95: {_fmt(summary['tpot_ms'])} ms (client side, all endpoints).",
        "",
        "| endpoint | requests | failures | TTFT p50 / p95 (ms) | TPOT p50 / p95 (ms) | latency p50 / p95 (ms) |",
        "|---|---|---|---|---|---|",
    ]
    for name, e in summary["endpoints"].items():
        lines.append(
            f"| `{e.get('method', '')} {name}` | {e.get('requests', 0)} | {e.get('failures', 0)} "
            f"| {_fmt(e.get('ttft_ms'))} | {_fmt(e.get('tpot_ms'))} | {_fmt(e.get('latency_ms'))} |"
        )
    if "dashboard" in summary:
        empty = [d for d in summary["dashboard"] if not d["has_data"]]
        lines += [
            "",
            f"Dashboard: {len(summary['dashboard'])} queries evaluated by Prometheus "
            f"($__rate_interval = {summary['rate_interval']}), {len(empty)} without data; "
            f"server-side sum(h2o_requests_total) = {summary['server_requests_total']:g}.",
            "",
            "| panel | query | series | finite points |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {d['panel']} | `{d['promql']}` | {d['series']} | {d['finite_points']} |" for d in summary["dashboard"]
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--host", help="base URL of a running server (loopback only)")
    target.add_argument("--serve", action="store_true", help="start python -m app here (H2O_* from the env)")
    parser.add_argument("--prometheus", action="store_true", help="also run Prometheus and check the dashboard")
    parser.add_argument("--users", type=int, default=3)
    parser.add_argument("--spawn-rate", type=float, default=None, help="users started per second (default: all)")
    parser.add_argument("--run-time", type=int, default=30, help="seconds of load")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--turns", type=int, default=6, help="turns per session before a user starts a new one")
    parser.add_argument("--rate-interval", default="15s", help="substituted for Grafana's $__rate_interval")
    parser.add_argument("--out", type=Path, default=REPO / "loadtest" / "results" / time.strftime("%Y%m%d-%H%M%S"))
    parser.add_argument("user_classes", nargs="*", help="locust user classes (default: all)")
    args = parser.parse_args(argv)
    summary = load_run(
        args.out,
        host=args.host,
        serve_env={} if args.serve else None,
        prometheus=args.prometheus,
        users=args.users,
        spawn_rate=args.spawn_rate,
        run_time_s=args.run_time,
        max_new_tokens=args.max_new_tokens,
        turns=args.turns,
        user_classes=args.user_classes,
        rate_interval=args.rate_interval,
    )
    print(render(summary), end="")
    print(f"written to {args.out}")
    ok = summary["replies"] > 0 and summary["failures"] == 0 and summary["locust_exit_code"] == 0
    return 0 if ok and all(d["has_data"] for d in summary.get("dashboard", [])) else 1


if __name__ == "__main__":
    sys.exit(main())
