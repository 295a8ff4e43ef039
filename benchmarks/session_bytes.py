"""Bytes per conversation on the real server: what a short and a full session hold, and how many fit in a GiB.

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.session_bytes                 # SmolLM2, model-dtype vs default
    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.session_bytes --kv-dtypes auto,int8,k8v4,int4
    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.session_bytes --smoke --out /tmp/bench  # tiny model, ~1 min

What an operator sizes a replica by. For each KV storage, one ``python -m app`` process with the server's defaults
(``H2O_POLICY``, ``H2O_POLICY_SLACK``; only ``H2O_KV_DTYPE`` set) serves ``--sessions`` short chats (one turn of about
100 tokens, prompt and reply) and as many full ones (turns until the cache has evicted, so it holds ``capacity +
slack`` slots). Reported per session: ``cache_bytes`` from ``GET /sessions/{id}`` (the session's own report),
checked against the ``h2o_kv_cache_bytes`` gauge of a real ``/metrics`` scrape (their sum must be equal) and
against ``h2o_cache.budget.session_nbytes`` (the capacity formula), and the growth of the server's resident set
(``process_resident_memory_bytes``) per session as a cross-check that the bytes are what the process pays. Sessions
per GiB = 2^30 / bytes. "Before" is the layout main had until issue #13: every session preallocated
``capacity + slack`` slots in the model's dtype with int64 positions, ``(capacity + slack) x layers x kv_heads x
(2 x head_dim x dtype bytes + 13)`` bytes however short it was.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import requests
import torch
from transformers import AutoConfig

from app.settings import Settings
from benchmarks import report
from h2o_cache import CachePolicy
from h2o_cache.budget import kv_shape, session_nbytes
from h2o_cache.loading import resolve_model_path
from loadtest.stack import save_tiny_llama, serve

COLUMNS = [
    "KV storage",
    "Session",
    "Tokens held",
    "cache_bytes (MB)",
    "Formula (MB)",
    "RSS growth per session (MB)",
    "Sessions per GiB",
    "Bytes / before",
]
SHORT_MESSAGE = "Tell me a short story about a lighthouse keeper and a storm."
FULL_MESSAGE = " ".join(["The keeper climbed the stairs again and wrote the weather into the log."] * 40)
BEFORE_POLICY = "h2o_4_256_512"
"""The server's default policy until issue #13 (stored in the model's dtype, preallocated)."""
SHORT_REPLY = 60
"""With the message in the chat template, a short session holds about 100 tokens."""
GREEDY = {"temperature": 0, "stream": False}


def metric(base_url: str, name: str) -> float:
    """One unlabelled sample of a real ``/metrics`` scrape."""
    text = requests.get(f"{base_url}/metrics", timeout=30).text
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


def turn(base_url: str, session_id: str, message: str, new_tokens: int) -> dict:
    response = requests.post(
        f"{base_url}/sessions/{session_id}/generate",
        timeout=600,
        json={"message": message, "max_new_tokens": new_tokens, "min_new_tokens": new_tokens, **GREEDY},
    )
    response.raise_for_status()
    return response.json()


def measure(base_url: str, kind: str, n_sessions: int, full_after: int) -> dict:
    """Open ``n_sessions`` sessions of one kind; their reported bytes, the gauge, and the RSS growth per session."""
    warm = f"warm-up-{kind}"  # the first turns of a process allocate what every later one reuses
    turn(base_url, warm, SHORT_MESSAGE, 8)
    requests.delete(f"{base_url}/sessions/{warm}", timeout=30).raise_for_status()
    rss_before = metric(base_url, "process_resident_memory_bytes")
    ids = [f"{kind}-{i}" for i in range(n_sessions)]
    for sid in ids:
        if kind == "short":
            turn(base_url, sid, SHORT_MESSAGE, SHORT_REPLY)
        else:
            while turn(base_url, sid, FULL_MESSAGE, 16)["cache_tokens_seen"] <= full_after:
                pass
    infos = [requests.get(f"{base_url}/sessions/{sid}", timeout=30).json() for sid in ids]
    rss_after = metric(base_url, "process_resident_memory_bytes")
    return {
        "cache_bytes": [i["cache_bytes"] for i in infos],
        "cache_tokens": [i["cache_tokens"] for i in infos],
        "policy": infos[0]["policy"],
        "rss_per_session": (rss_after - rss_before) / n_sessions,
    }


def run_storage(args, kv_dtype: str, config, device: str, dtype: torch.dtype, log_dir: Path) -> dict:
    """One server process with ``H2O_KV_DTYPE=kv_dtype``: short sessions, then full ones."""
    settings = Settings()
    policy = CachePolicy.parse(settings.policy, slack=settings.policy_slack, kv_dtype=kv_dtype)
    env = {
        "H2O_MODEL": args.model,
        "H2O_KV_DTYPE": kv_dtype,
        "H2O_MAX_SESSIONS": str(4 * args.sessions),
        "H2O_DEVICE": device,
    }
    with serve(log_dir / f"server-{kv_dtype}.log", env) as base_url:
        short = measure(base_url, "short", args.sessions, 0)
        full = measure(base_url, "full", args.sessions, policy.capacity + policy.slack)
        gauge = metric(base_url, "h2o_kv_cache_bytes")
    assert gauge == sum(short["cache_bytes"]) + sum(full["cache_bytes"]), "the gauge is not the sum of the sessions"
    rows = {}
    for kind, result in (("short", short), ("full", full)):
        tokens = max(result["cache_tokens"])
        rows[kind] = {**result, "tokens": tokens, "formula": session_nbytes(config, policy, dtype, n_tokens=tokens)}
    return {
        "kv_dtype": kv_dtype,
        "policy": policy.name,
        "gauge": gauge,
        "sessions": rows,
        "largest": session_nbytes(config, policy, dtype),
        "largest_slots": policy.capacity + policy.slack,
    }


def before_bytes(config, policy: CachePolicy, dtype: torch.dtype) -> int:
    """The pre-#13 layout: every session ``capacity + slack`` slots in the model's dtype, int64 positions."""
    layers, kv_heads, head_dim = kv_shape(config)
    per_head = 2 * head_dim * dtype.itemsize + 4 + 8 + 1
    return (policy.capacity + policy.slack) * layers * kv_heads * per_head


def render(results: list[dict], before: int) -> tuple[list[str], list[list]]:
    mb = 1e6
    rows = [
        [
            f"before (`{BEFORE_POLICY}`, model dtype, preallocated)",
            kind,
            "-",
            before / mb,
            before / mb,
            "-",
            2**30 // before,
            "1.00",
        ]
        for kind in ("short", "full")
    ]
    for result in results:
        for kind, r in result["sessions"].items():
            held = max(r["cache_bytes"])
            rows.append(
                [
                    result["kv_dtype"],
                    kind,
                    r["tokens"],
                    held / mb,
                    r["formula"] / mb,
                    r["rss_per_session"] / mb,
                    2**30 // held,
                    f"{held / before:.2f}",
                ]
            )
        largest = result["largest"]
        rows.append(
            [
                result["kv_dtype"],
                f"largest ({result['largest_slots']} slots)",
                "-",
                "-",
                largest / mb,
                "-",
                2**30 // largest,
                f"{largest / before:.2f}",
            ]
        )
    return COLUMNS, rows


def main(argv=None) -> None:
    parser = report.common_args(__doc__.splitlines()[0])
    parser.add_argument("--kv-dtypes", default=f"auto,{Settings().kv_dtype}", help="KV storages to serve")
    parser.add_argument("--sessions", type=int, default=16, help="sessions of each kind per storage")
    args = parser.parse_args(argv)
    start = report.run_start()
    out = report.out_dir(args)
    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke:
            args.model, args.sessions = save_tiny_llama(Path(tmp) / "tiny"), min(args.sessions, 4)
        config = AutoConfig.from_pretrained(resolve_model_path(args.model))
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.float16 if device == "cuda" else torch.float32  # the server's default on each
        results = [
            run_storage(args, kv_dtype, config, device, dtype, Path(tmp)) for kv_dtype in args.kv_dtypes.split(",")
        ]
    settings = Settings()
    before = before_bytes(config, CachePolicy.parse(BEFORE_POLICY, slack=settings.policy_slack), dtype)
    columns, rows = render(results, before)
    legend = (
        f"\nServer defaults (`{settings.policy}`, slack {settings.policy_slack}), {args.sessions} sessions of "
        "each kind per storage, one `python -m app` per storage. Short: one turn, ~100 tokens; full: turns "
        "until the cache evicted, measured at rest after the turn (a session between cuts holds `capacity` to "
        "`capacity + slack` tokens, in whole pages); largest: the formula at `capacity + slack` slots, what "
        "a session holds just before a cut and what sizing must assume. cache_bytes: `GET /sessions/{id}` "
        "(the largest of the sessions; their sum "
        "equals the `h2o_kv_cache_bytes` gauge of a real scrape); Formula: `h2o_cache.budget.session_nbytes`; "
        "RSS growth: `process_resident_memory_bytes` after minus before, per session (allocator noise "
        "included). Before: the layout until issue #13, every session preallocated in the model's dtype "
        "with int64 positions, under that default policy.\n"
    )
    (out / "session_bytes.md").write_text(report.markdown_table(columns, rows) + legend)
    report.write_json(
        out / "session_bytes.json", {"meta": report.meta(args, start), "before_bytes": before, "results": results}
    )
    print(report.markdown_table(columns, rows) + legend)


if __name__ == "__main__":
    main()
