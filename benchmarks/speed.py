"""Generation speed vs context length: TTFT and TPOT of the full cache vs bounded caches, interleaved in one run.

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.speed --configs baseline,h2o_4_128_512
    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.speed --smoke --out /tmp/bench

For each context length and rep, every config (one worker process each) prefills the prompt (chunked by the
policy's ``chunk_size``), then the configs greedy-decode ``--new`` tokens in turn, one token each at a time, so a
change in the machine's load hits all of them alike. Ratios are to the first config (the full cache) at the same
context, from the same run.

Eviction + scoring overhead: for each bounded config the run adds a context of ``capacity + slack / 2`` tokens (what
such a cache holds on average once full) and compares the config's *mean* decode time past its budget (eviction
steps included; ``--new`` should cover a slack) with the full cache's at that small context: the same attention
length, without scores or eviction.
"""

from __future__ import annotations

from benchmarks import report
from benchmarks.ppl import make_specs, parse_config, timing_pass
from benchmarks.workers import Pool
from h2o_cache import CachePolicy


def main(argv=None) -> None:
    parser = report.common_args(__doc__.splitlines()[0])
    parser.add_argument(
        "--configs", default="baseline,h2o_4_256_512,streaming_4_512", help="the first is the reference for the ratios"
    )
    parser.add_argument("--contexts", default="1024,2048,4096,8192", help="prompt lengths in tokens")
    parser.add_argument("--text", default="moby", help="text row the prompts are cut from")
    parser.add_argument("--new", type=int, default=32, help="generated tokens per run")
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args(argv)
    if args.smoke:
        args.contexts, args.new, args.reps = "64,128,256", 8, 1
        if args.configs == parser.get_default("configs"):
            args.configs = "baseline,h2o_4_16_64"
    report.apply_smoke(args)
    start = report.run_start()
    configs = [parse_config(c) for c in args.configs.split(",") if c.strip()]
    held = [held_tokens(name, options) for name, options in configs]
    contexts = sorted({int(c) for c in args.contexts.split(",")} | {h for h in held if h})
    specs = make_specs(args, configs)
    results = []
    with Pool(specs, inline=args.inline) as pool:
        for ctx in contexts:
            timing = timing_pass(pool, args.text, ctx, args.new, args.reps, desc=f"context {ctx}")
            for spec, t in zip(specs, timing):
                results.append({"config": spec.label, "context": ctx, **t})
        memory = [pool.call(i, "memory") for i in range(len(specs))]
    labels = [s.label for s in specs]
    for r in results:
        ref = next(x for x in results if x["context"] == r["context"] and x["config"] == labels[0])
        r["tpot_ratio"], r["ttft_ratio"] = r["tpot_ms"] / ref["tpot_ms"], r["ttft_s"] / ref["ttft_s"]
    overhead = overhead_rows(results, labels, held)
    out = report.out_dir(args)
    text = render(results, labels, args) + render_overhead(overhead, labels[0])
    (out / "speed.md").write_text(text)
    report.write_json(
        out / "speed.json",
        {
            "meta": report.meta(args, start),
            "args": vars(args),
            "results": results,
            "overhead": overhead,
            "memory": dict(zip(labels, memory)),
        },
    )
    for metric, ylabel in (("tpot_ms", "TPOT (ms)"), ("ttft_s", "TTFT (s)")):
        series = {
            lab: (
                [r["context"] for r in results if r["config"] == lab],
                [r[metric] for r in results if r["config"] == lab],
            )
            for lab in labels
        }
        report.line_plot(
            out / f"speed_{metric.split('_')[0]}.png",
            series,
            "context (tokens)",
            ylabel,
            f"{ylabel} vs context ({args.model})",
        )
    print(text)


def held_tokens(name: str, options: dict) -> int | None:
    """Tokens a bounded cache holds on average once full (``capacity + slack / 2``); None for the full cache."""
    policy = CachePolicy.parse(name, **options)
    return None if policy.capacity is None else policy.capacity + policy.slack // 2


def overhead_rows(results: list[dict], labels: list[str], held: list[int | None]) -> list[dict]:
    """Each bounded config's mean TPOT past its budget over the full cache's (``labels[0]``) at the context it
    holds: the cost of scoring and eviction at the same attention length."""

    def tpot(label: str, context: int) -> float:
        return next(r["tpot_mean_ms"] for r in results if r["config"] == label and r["context"] == context)

    rows = []
    for label, size in zip(labels[1:], held[1:]):
        if size is None:
            continue
        same_size = tpot(labels[0], size)
        for r in results:
            if r["config"] == label and r["context"] > size:
                rows.append(
                    {
                        "config": label,
                        "context": r["context"],
                        "held_tokens": size,
                        "tpot_mean_ms": r["tpot_mean_ms"],
                        "base_same_size_ms": same_size,
                        "overhead": r["tpot_mean_ms"] / same_size - 1,
                    }
                )
    return rows


def render_overhead(rows: list[dict], base: str) -> str:
    if not rows:
        return ""
    cols = ["Config", "Context", "Held tokens", "Mean TPOT (ms)", f"{base} at held tokens (ms)", "Overhead (%)"]
    table = [
        [r["config"], r["context"], r["held_tokens"], r["tpot_mean_ms"], r["base_same_size_ms"], 100 * r["overhead"]]
        for r in rows
    ]
    return (
        "\n\n## Eviction + scoring overhead (mean decode time, eviction steps included, vs the full cache "
        "at the same attention length)\n\n" + report.markdown_table(cols, table)
    )


def render(results, labels, args) -> str:
    cols = ["Context", "Config", "TTFT (s)", "TPOT (ms)", "Avg Attn (ms)", "TTFT / base", "TPOT / base", "KV (MB)"]
    rows = [
        [
            r["context"],
            r["config"],
            r["ttft_s"],
            r["tpot_ms"],
            r["attn_ms"],
            r["ttft_ratio"],
            r["tpot_ratio"],
            r["gen_kv_bytes"] / 2**20,
        ]
        for r in results
    ]
    return (
        f"# Generation speed vs context ({args.model}, {args.new} new tokens, {args.reps} interleaved reps, "
        f"medians; base = {labels[0]})\n\n" + report.markdown_table(cols, rows)
    )


if __name__ == "__main__":
    main()
