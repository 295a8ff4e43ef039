"""Generation speed vs context length: TTFT and TPOT of the full cache vs bounded caches, interleaved in one run.

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.speed --configs baseline,h2o_4_128_512
    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.speed --smoke --out /tmp/bench

For each context length, every rep runs every config once (round-robin, one worker process per config): prefill
the prompt (chunked by the policy's ``chunk_size``), then greedy-decode ``--new`` tokens. Ratios are to the first
config (the full cache) at the same context, from the same run.
"""

from __future__ import annotations


from benchmarks import report
from benchmarks.ppl import make_specs, parse_config, timing_pass
from benchmarks.workers import Pool


def main(argv=None) -> None:
    parser = report.common_args(__doc__.splitlines()[0])
    parser.add_argument("--configs", default="baseline,h2o_4_256_512,streaming_4_512",
                        help="the first is the reference for the ratios")
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
    contexts = [int(c) for c in args.contexts.split(",")]
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
    out = report.out_dir(args)
    text = render(results, labels, args)
    (out / "speed.md").write_text(text)
    report.write_json(out / "speed.json", {"meta": report.meta(args, start), "args": vars(args),
                                           "results": results, "memory": dict(zip(labels, memory))})
    for metric, ylabel in (("tpot_ms", "TPOT (ms)"), ("ttft_s", "TTFT (s)")):
        series = {lab: ([r["context"] for r in results if r["config"] == lab],
                        [r[metric] for r in results if r["config"] == lab]) for lab in labels}
        report.line_plot(out / f"speed_{metric.split('_')[0]}.png", series, "context (tokens)", ylabel,
                         f"{ylabel} vs context ({args.model})")
    print(text)


def render(results, labels, args) -> str:
    cols = ["Context", "Config", "TTFT (s)", "TPOT (ms)", "Avg Attn (ms)", "TTFT / base", "TPOT / base",
            "KV (MB)"]
    rows = [[r["context"], r["config"], r["ttft_s"], r["tpot_ms"], r["attn_ms"], r["ttft_ratio"], r["tpot_ratio"],
             r["gen_kv_bytes"] / 2**20] for r in results]
    return (f"# Generation speed vs context ({args.model}, {args.new} new tokens, {args.reps} interleaved reps, "
            f"medians; base = {labels[0]})\n\n" + report.markdown_table(cols, rows))


if __name__ == "__main__":
    main()
