"""Long-context stress test: stream one book past the model's trained context, window by window.

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.stress                  # H2O/streaming to 32k, full cache to 12k
    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.stress --smoke --out /tmp/bench

Each config runs in its own worker; windows of ``--window`` tokens go round-robin. Per window: the first
``--timed`` tokens go one per forward (their median time is the window's TPOT), the rest ``--step`` per forward
(teacher-forced, bounded CPU time: 32k one-token forwards would take about an hour here). Recorded per window:
perplexity, TPOT, KV bytes (allocated), kept tokens and worker RSS. The full cache stops at ``--baseline-tokens``
because its per-token time and memory grow with the context.
"""

from __future__ import annotations

import math

from tqdm import tqdm

from benchmarks import report
from benchmarks.ppl import make_specs, parse_config
from benchmarks.workers import Pool


def main(argv=None) -> None:
    parser = report.common_args(__doc__.splitlines()[0])
    parser.add_argument("--configs", default="baseline,streaming_4_512,h2o_4_128_512,h2o_4_128_512:rolling=false")
    parser.add_argument("--text", default="tale", help="book row (default: the held-out book)")
    parser.add_argument("--tokens", type=int, default=32768, help="tokens for the bounded caches")
    parser.add_argument("--baseline-tokens", type=int, default=12288, help="tokens for the full cache")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--step", type=int, default=64, help="tokens per forward outside the timed ones")
    parser.add_argument("--timed", type=int, default=8, help="one-token forwards per window (TPOT)")
    parser.add_argument("--trained", type=int, default=None, help="trained context (default: the model config's)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.tokens, args.baseline_tokens, args.window, args.step, args.timed = 1024, 768, 128, 16, 4
        if args.configs == parser.get_default("configs"):
            args.configs = "baseline,streaming_4_64,h2o_4_16_64,h2o_4_16_64:rolling=false"
        args.trained = args.trained or 512
    args.trained = args.trained or 8192
    report.apply_smoke(args)
    start = report.run_start()
    configs = [parse_config(c) for c in args.configs.split(",") if c.strip()]
    specs = make_specs(args, configs)
    budgets = [args.baseline_tokens if name in ("baseline", "full") else args.tokens for name, _ in configs]
    windows: list[list[dict]] = [[] for _ in specs]
    with Pool(specs, inline=args.inline) as pool:
        for i, n in enumerate(budgets):
            pool.call(i, "start_stream", rows=[args.text], n_tokens=n, step=args.step)
        done = [False] * len(specs)
        with tqdm(total=sum(budgets), desc="stress", unit="tok", smoothing=0) as bar:
            while not all(done):
                for i in range(len(specs)):
                    if done[i]:
                        continue
                    r = pool.call(i, "advance", n_tokens=args.window, n_timed_single=args.timed)
                    windows[i].append(
                        {
                            "end": r["end"],
                            "ppl": math.exp(r["nll_sum"] / r["n_targets"]),
                            "nll_sum": r["nll_sum"],
                            "n_targets": r["n_targets"],
                            "tpot_ms": 1e3 * report.median(r["single_s"]),
                            "kv_bytes": r["kv_bytes"],
                            "kept_tokens": r["kept_tokens"],
                            "rss_bytes": r["rss_bytes"],
                        }
                    )
                    bar.update(r["end"] - r["start"])
                    done[i] = r["done"]
        for i in range(len(specs)):
            pool.call(i, "stream_result")
    labels = [s.label for s in specs]
    summary = [summarize(lab, w, args.trained) for lab, w in zip(labels, windows)]
    out = report.out_dir(args)
    text = render(summary, args)
    (out / "stress.md").write_text(text)
    report.write_json(
        out / "stress.json",
        {
            "meta": report.meta(args, start),
            "args": vars(args),
            "summary": summary,
            "windows": dict(zip(labels, windows)),
        },
    )
    for key, ylabel, scale, logy in (
        ("ppl", "windowed perplexity", 1, True),
        ("tpot_ms", "TPOT (ms)", 1, False),
        ("kv_bytes", "KV cache (MB)", 2**-20, False),
        ("rss_bytes", "worker RSS (GB)", 2**-30, False),
    ):
        series = {lab: ([x["end"] for x in w], [x[key] * scale for x in w]) for lab, w in zip(labels, windows)}
        report.line_plot(
            out / f"stress_{key.split('_')[0]}.png",
            series,
            "position (tokens)",
            ylabel,
            f"{ylabel} per {args.window}-token window ({args.text})",
            logy=logy,
            vline=args.trained,
        )
    print(text)


def summarize(label: str, windows: list[dict], trained: int) -> dict:
    """Windowed PPL past the trained context relative to the average over the first ``trained`` tokens."""
    first = [w for w in windows if w["end"] <= trained]
    past = [w for w in windows if w["end"] - w["n_targets"] >= trained]
    first_ppl = math.exp(sum(w["nll_sum"] for w in first) / sum(w["n_targets"] for w in first)) if first else None
    out = {
        "config": label,
        "tokens": windows[-1]["end"],
        "first_ppl": first_ppl,
        "tpot_first_ms": windows[0]["tpot_ms"],
        "tpot_last_ms": windows[-1]["tpot_ms"],
        "kv_last_mb": windows[-1]["kv_bytes"] / 2**20,
        "rss_last_gb": windows[-1]["rss_bytes"] / 2**30,
        "kv_max_mb": max(w["kv_bytes"] for w in windows) / 2**20,
    }
    if past and first_ppl:
        out["past_ppl"] = math.exp(sum(w["nll_sum"] for w in past) / sum(w["n_targets"] for w in past))
        out["past_max_ratio"] = max(w["ppl"] for w in past) / first_ppl
        out["past_mean_ratio"] = out["past_ppl"] / first_ppl
    return out


def render(summary: list[dict], args) -> str:
    cols = [
        "Config",
        "Tokens",
        f"PPL first {args.trained}",
        f"PPL past {args.trained}",
        "past / first",
        "worst window / first",
        "TPOT first (ms)",
        "TPOT last (ms)",
        "KV last (MB)",
        "KV max (MB)",
        "RSS last (GB)",
    ]
    rows = [
        [
            s["config"],
            s["tokens"],
            s["first_ppl"],
            s.get("past_ppl"),
            s.get("past_mean_ratio"),
            s.get("past_max_ratio"),
            s["tpot_first_ms"],
            s["tpot_last_ms"],
            s["kv_last_mb"],
            s["kv_max_mb"],
            s["rss_last_gb"],
        ]
        for s in summary
    ]
    return (
        f"# Long-context stress ({args.model}, {args.text}, windows of {args.window}, {args.step} tokens per "
        f"forward + {args.timed} timed one-token forwards per window)\n\n" + report.markdown_table(cols, rows)
    )


if __name__ == "__main__":
    main()
