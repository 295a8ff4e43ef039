"""Continuous batching and weight precision: 1 vs N concurrent streaming sessions through the engine, memory with many
sessions held, and decode speed + perplexity per weight dtype.

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.batching                 # SmolLM2, 16 sessions x 256 tokens
    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.batching --smoke --out /tmp/bench

Streams run through `app.engine.Engine` (the server's scheduler, no HTTP) with `min_new_tokens = max_new_tokens`, so
every reply has exactly `--new` tokens. A session's TPOT is its mean gap between tokens after the first; the
aggregate rate is every generated token over the wall time from the first submit to the last token. Single-session
and N-session runs alternate (`--reps`); ratios come from the medians of the same run.
"""

from __future__ import annotations

import asyncio
import math
import os
import statistics
import time

import torch

from app.engine import Engine
from app.metrics import Metrics
from app.sampling import SamplingParams
from app.sessions import Session
from app.settings import Settings
from benchmarks import report
from benchmarks.data import tokenize
from h2o_cache import CachePolicy, load_model, make_cache

TOPICS = [
    "the sea",
    "a city at night",
    "old maps",
    "winter",
    "a lighthouse",
    "trains",
    "bees",
    "the moon",
    "a library",
    "rivers",
    "mountains",
    "a market",
    "clocks",
    "forests",
    "bridges",
    "the desert",
]


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


def start_engine(model, **settings) -> Engine:
    engine = Engine(Settings(max_running=64, max_waiting=256, **settings), Metrics(), preloaded=model)
    engine.start()
    while not engine.ready:
        time.sleep(0.01)
    return engine


async def stream(engine: Engine, session: Session, message: str, new: int, seed: int) -> dict:
    params = SamplingParams(max_new_tokens=new, min_new_tokens=new, temperature=0.7, top_p=0.95, seed=seed)
    submitted = time.perf_counter()
    generation = engine.submit(session, [{"role": "user", "content": message}], params)
    times = []
    async for event in generation:
        if hasattr(event, "token_id"):
            times.append(time.perf_counter())
    gaps = [b - a for a, b in zip(times, times[1:])]
    return {
        "submitted": submitted,
        "first": times[0],
        "last": times[-1],
        "tokens": len(times),
        "tpot_ms": 1000 * (times[-1] - times[0]) / max(1, len(times) - 1),
        "gaps_ms": [1000 * g for g in gaps],
    }


def concurrent(model, n: int, new: int, policy: str, batching: bool, max_batch: int) -> dict:
    """`n` fresh sessions, one turn each, all submitted at once."""
    engine = start_engine(model, batching=batching, max_batch=max_batch)
    sessions = [Session(id=f"s{i}", policy=CachePolicy.parse(policy, slack=64)) for i in range(n)]

    async def everyone():
        return await asyncio.gather(
            *(
                stream(engine, s, f"Write a long essay about {TOPICS[i % len(TOPICS)]}.", new, seed=i)
                for i, s in enumerate(sessions)
            )
        )

    try:
        runs = asyncio.run(everyone())
    finally:
        engine.stop()
    wall = max(r["last"] for r in runs) - min(r["submitted"] for r in runs)
    tpots = [r["tpot_ms"] for r in runs]
    gaps = sorted(g for r in runs for g in r["gaps_ms"])
    return {
        "sessions": n,
        "batching": batching,
        "tokens": sum(r["tokens"] for r in runs),
        "wall_s": wall,
        "tok_s": sum(r["tokens"] for r in runs) / wall,
        "tpot_ms_mean": statistics.mean(tpots),
        "tpot_ms_p95": percentile(tpots, 95),
        "gap_ms_p95": percentile(gaps, 95),
        "ttft_s_max": max(r["first"] - r["submitted"] for r in runs),
    }


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, math.ceil(q / 100 * len(values)) - 1)]


def memory(model, n_sessions: int, turns: int, new: int, policy: str, max_batch: int) -> list[dict]:
    """RSS after each round of turns of `n_sessions` sessions (all submitted at once, batched)."""
    engine = start_engine(model, batching=True, max_batch=max_batch)
    sessions = [Session(id=f"m{i}", policy=CachePolicy.parse(policy, slack=64)) for i in range(n_sessions)]
    rows = [{"turn": 0, "rss_mb": rss_mb(), "cache_tokens_max": 0, "cache_mb": 0.0}]
    try:
        for turn in range(1, turns + 1):

            async def everyone(turn: int = turn):
                return await asyncio.gather(
                    *(
                        stream(engine, s, f"Tell me more about {TOPICS[i % len(TOPICS)]}.", new, seed=turn * 1000 + i)
                        for i, s in enumerate(sessions)
                    )
                )

            asyncio.run(everyone())
            rows.append(
                {
                    "turn": turn,
                    "rss_mb": rss_mb(),
                    "cache_tokens_max": max(s.cache_tokens for s in sessions),
                    "cache_tokens_seen": max(s.cache_tokens_seen for s in sessions),
                    "cache_mb": sum(s.cache.nbytes() for s in sessions) / 2**20,
                }
            )
    finally:
        engine.stop()
    return rows


def load(args, dtype: str | None):
    """(model, tokenizer): the real model, or for --smoke a tiny random Llama with SmolLM2's chat tokenizer."""
    if not args.smoke:
        return load_model(args.model, device=args.device, dtype=dtype)
    from h2o_cache.loading import resolve_dtype, tiny_llama
    from h2o_cache.weights import quantize_int8

    model, tokenizer = tiny_llama()
    model = model.to(resolve_dtype(dtype, "cpu"))
    return (quantize_int8(model) if dtype == "int8" else model), tokenizer


def dtype_row(name: str, args, ids: list[int], context: int, steps: int) -> dict:
    """Decode ms/token at `context` tokens (full cache, greedy) and perplexity over `ids` for one weight dtype."""
    model, _ = load(args, name)
    before = rss_mb()
    with torch.inference_mode():
        labels = torch.tensor([ids])
        nll = model(input_ids=labels, labels=labels).loss.item()
        cache = make_cache(model, "full")
        prompt = torch.tensor([(ids * (context // len(ids) + 1))[:context]])
        out = model(input_ids=prompt, past_key_values=cache, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1:].argmax(-1)
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            out = model(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1)
            times.append(time.perf_counter() - t)
            token = out.logits[:, -1:].argmax(-1)
    return {
        "dtype": name,
        "decode_ms": 1000 * statistics.median(times),
        "ppl": math.exp(nll),
        "rss_mb_after_load": before,
    }


def main(argv=None) -> None:
    parser = report.common_args(__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=16)
    parser.add_argument("--new", type=int, default=256, help="tokens per reply")
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--policy", default="h2o_4_256_512")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--held", type=int, default=64, help="sessions held for the memory run")
    parser.add_argument("--held-turns", type=int, default=3)
    parser.add_argument("--held-new", type=int, default=48)
    parser.add_argument("--held-policy", default="h2o_8_56_128", help="small, so the memory run reaches eviction")
    parser.add_argument("--dtypes", default="fp32,bf16,int8")
    parser.add_argument("--ppl-tokens", type=int, default=512)
    parser.add_argument("--context", type=int, default=1024, help="context of the dtype decode timing")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: batching,memory,dtypes")
    args = parser.parse_args(argv)
    if args.smoke:
        args.sessions, args.new, args.held, args.held_turns, args.held_new = 4, 8, 8, 2, 8
        args.policy, args.held_policy, args.context, args.ppl_tokens = "h2o_4_12_32", "h2o_4_12_32", 64, 64
        args.dtypes = "fp32,int8"
        args.model = "tiny"
    torch.set_num_threads(args.threads)
    skip = set(args.skip.split(","))
    start = report.run_start()
    loadavg = {"before": os.getloadavg()}
    payload: dict = {"args": vars(args)}
    out = report.out_dir(args)

    if "dtypes" not in skip:
        _, tokenizer = load(args, "fp32")
        ids = tokenize(tokenizer, "wikitext", args.ppl_tokens, args.data_dir, synthetic=args.smoke)
        payload["dtypes"] = [
            dtype_row(name, args, ids, args.context, 8 if args.smoke else 24) for name in args.dtypes.split(",")
        ]
    model = load(args, args.dtype)
    payload["rss_mb_weights"] = rss_mb()
    print(
        report.markdown_table(
            ["dtype", "decode_ms", "ppl"], [[d["dtype"], d["decode_ms"], d["ppl"]] for d in payload.get("dtypes", [])]
        ),
        flush=True,
    )
    if "batching" not in skip:
        runs = []
        for _ in range(args.reps):  # alternate, so both see the same machine load
            runs.append(concurrent(model, 1, args.new, args.policy, True, args.max_batch))
            runs.append(concurrent(model, args.sessions, args.new, args.policy, True, args.max_batch))
        payload["runs"] = runs
        print(runs, flush=True)
        one = [r for r in runs if r["sessions"] == 1]
        many = [r for r in runs if r["sessions"] > 1]
        payload["summary"] = {
            "tok_s_1": report.median([r["tok_s"] for r in one]),
            "tok_s_n": report.median([r["tok_s"] for r in many]),
            "tpot_ms_1": report.median([r["tpot_ms_mean"] for r in one]),
            "tpot_ms_p95_n": report.median([r["tpot_ms_p95"] for r in many]),
        }
        s = payload["summary"]
        s["throughput_ratio"], s["tpot_p95_ratio"] = s["tok_s_n"] / s["tok_s_1"], s["tpot_ms_p95_n"] / s["tpot_ms_1"]
    report.write_json(out / "batching.json", payload)  # partial results survive an interrupted memory run
    if "memory" not in skip:
        payload["memory"] = memory(model, args.held, args.held_turns, args.held_new, args.held_policy, args.max_batch)
    loadavg["after"] = os.getloadavg()
    payload["loadavg"] = loadavg
    payload["meta"] = report.meta(args, start)
    report.write_json(out / "batching.json", payload)
    text = render(payload, args)
    (out / "batching.md").write_text(text)
    print(text)


def render(p: dict, args) -> str:
    load = p["loadavg"]
    text = (
        f"# Continuous batching ({args.model}, {args.threads} torch thread(s), load average "
        f"{load['before'][0]:.1f} before / {load['after'][0]:.1f} after)\n\n"
    )
    if "runs" in p:
        s = p["summary"]
        text += (
            f"## 1 vs {args.sessions} concurrent streams, {args.new}-token replies, policy {args.policy}, "
            f"max batch {args.max_batch}\n\n"
        )
        cols = [
            "Sessions",
            "Tokens",
            "Wall (s)",
            "Aggregate tok/s",
            "TPOT mean (ms)",
            "TPOT p95 (ms)",
            "Gap p95 (ms)",
            "Max TTFT (s)",
        ]
        rows = [
            [
                r["sessions"],
                r["tokens"],
                r["wall_s"],
                r["tok_s"],
                r["tpot_ms_mean"],
                r["tpot_ms_p95"],
                r["gap_ms_p95"],
                r["ttft_s_max"],
            ]
            for r in p["runs"]
        ]
        text += report.markdown_table(cols, rows)
        text += (
            f"\nAggregate throughput {s['throughput_ratio']:.2f}x a single session's (target >= 5x); "
            f"per-session TPOT p95 {s['tpot_p95_ratio']:.2f}x the single-session TPOT (target <= 3x).\n\n"
        )
    if "memory" in p:
        text += (
            f"## Memory with {args.held} sessions held ({args.held_turns} turns of {args.held_new} tokens, "
            f"policy {args.held_policy}); weights loaded: {p['rss_mb_weights']:.0f} MB RSS\n\n"
        )
        cols = ["After turn", "RSS (MB)", "Session caches (MB)", "Max kept tokens", "Max tokens seen"]
        rows = [
            [m["turn"], m["rss_mb"], m["cache_mb"], m["cache_tokens_max"], m.get("cache_tokens_seen", 0)]
            for m in p["memory"]
        ]
        text += report.markdown_table(cols, rows) + "\n"
    if "dtypes" in p:
        text += (
            f"## Weight precision: decode at {args.context} tokens of context (full cache, batch 1), "
            f"perplexity over {args.ppl_tokens} WikiText-2 tokens\n\n"
        )
        base = p["dtypes"][0]
        cols = ["dtype", "Decode (ms/token)", "Speed-up", "PPL", "PPL change"]
        rows = [
            [
                d["dtype"],
                d["decode_ms"],
                base["decode_ms"] / d["decode_ms"],
                d["ppl"],
                f"{100 * (d['ppl'] / base['ppl'] - 1):+.1f}%",
            ]
            for d in p["dtypes"]
        ]
        text += report.markdown_table(cols, rows)
    return text


if __name__ == "__main__":
    main()
