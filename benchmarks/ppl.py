"""Quality + speed table: teacher-forced perplexity through each compressed cache, plus interleaved TTFT/TPOT.

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.ppl                       # the table, 2048 tokens per text
    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.ppl --configs baseline,h2o_4_128_512 --tokens 4096
    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.ppl --smoke --out /tmp/bench  # tiny model, seconds

Configs take options after colons: ``h2o_4_64_256:score_mode=sum:slack=0``.
"""

from __future__ import annotations

import math

from tqdm import tqdm

from benchmarks import report
from benchmarks.data import expand_texts, group_of
from benchmarks.runner import Spec
from benchmarks.workers import Pool

SEED_CONFIGS = "baseline,streaming_8_256,streaming_8_512,h2o_4_32_256,h2o_8_32_256,h2o_8_64_512,h2o_4_16_128"
SMOKE_CONFIGS = "baseline,streaming_4_64,h2o_4_16_64"
GROUP_TITLES = {"wikitext": "Wikitext PPL", "pg19": "PG-19 PPL", "heldout": "Held-out PPL"}


def parse_config(text: str) -> tuple[str, dict]:
    """``"h2o_4_64_256:score_mode=sum:slack=0"`` -> ``("h2o_4_64_256", {"score_mode": "sum", "slack": 0})``."""
    name, *pairs = text.strip().split(":")
    options = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if value.lower() in ("true", "false"):
            options[key] = value.lower() == "true"
        elif value.lstrip("-").isdigit():
            options[key] = int(value)
        else:
            try:
                options[key] = float(value)
            except ValueError:
                options[key] = value
    return name, options


def make_specs(args, configs: list[tuple[str, dict]]) -> list[Spec]:
    return [
        Spec(
            policy=name,
            options=options,
            model=args.model,
            device=args.device,
            dtype=args.dtype,
            threads=args.threads,
            data_dir=args.data_dir,
        )
        for name, options in configs
    ]


def ppl_pass(pool: Pool, rows: list[str], n_tokens: int, step: int, segment: int = 64, desc: str = "ppl") -> list[dict]:
    """Teacher-forced NLL of every row under every config, advanced ``segment`` tokens at a time in round-robin.
    Returns per config: per-row and per-group PPL, pass time, KV bytes per sequence."""
    n = len(pool.specs)
    for i in range(n):
        pool.call(i, "start_stream", rows=rows, n_tokens=n_tokens, step=step)
    done = [False] * n
    with tqdm(total=n * n_tokens, desc=desc, unit="tok", smoothing=0) as bar:
        while not all(done):
            for i in range(n):
                if not done[i]:
                    step_result = pool.call(i, "advance", n_tokens=segment)
                    bar.update(step_result["end"] - step_result["start"])
                    done[i] = step_result["done"]
    return [stream_summary(spec, rows, pool.call(i, "stream_result")) for i, spec in enumerate(pool.specs)]


def stream_summary(spec: Spec, rows: list[str], raw: dict) -> dict:
    """One config's teacher-forced pass (``Session.stream_result``) as per-row and per-group PPL, pass time and
    KV bytes per sequence."""
    per_row = {row: nll for row, nll in zip(rows, raw["nll"])}
    groups: dict[str, list[float]] = {}
    for row, nll in per_row.items():
        groups.setdefault(group_of(row), []).extend(nll)
    return {
        "config": spec.label,
        "policy": spec.policy,
        "options": spec.options,
        "ppl": {row: math.exp(sum(v) / len(v)) for row, v in per_row.items()},
        "group_ppl": {g: math.exp(sum(v) / len(v)) for g, v in groups.items()},
        "group_nll": {g: sum(v) / len(v) for g, v in groups.items()},
        "ppl_time_s": raw["time_s"],
        "kv_bytes": raw["kv_bytes_max"],
        "kept_tokens_max": raw["kept_max"],
        "evicted_tokens": raw["evicted_tokens"],
    }


def timing_pass(
    pool: Pool, row: str, prompt_tokens: int, new_tokens: int, reps: int, desc: str = "timing"
) -> list[dict]:
    """Interleaved generation timing: per rep, every config prefills, then the configs decode token by token in
    turn. Medians over reps (TTFT) and over all decode steps (TPOT), plus the mean step (evictions included)."""
    n = len(pool.specs)
    ttft, decode, attn, kv = [[] for _ in range(n)], [[] for _ in range(n)], [[] for _ in range(n)], [0] * n
    with tqdm(total=reps * n * new_tokens, desc=desc, unit="tok") as bar:
        for _ in range(reps):
            for i in range(n):
                ttft[i].append(pool.call(i, "start_generation", row=row, prompt_tokens=prompt_tokens))
            bar.update(n)
            for _ in range(new_tokens - 1):
                for i in range(n):
                    step = pool.call(i, "decode_step")
                    decode[i].append(step["decode_s"])
                    attn[i].append(step["attn_s"])
                bar.update(n)
            for i in range(n):
                kv[i] = pool.call(i, "end_generation")
    out = []
    for i in range(n):
        per_rep = len(decode[i]) // reps
        totals = [t + sum(decode[i][r * per_rep : (r + 1) * per_rep]) for r, t in enumerate(ttft[i])]
        out.append(
            {
                "ttft_s": report.median(ttft[i]),
                "tpot_ms": 1e3 * report.median(decode[i]),
                "tpot_mean_ms": 1e3 * sum(decode[i]) / max(1, len(decode[i])),  # includes the 1-in-slack evictions
                "attn_ms": 1e3 * report.median(attn[i]),
                "gen_total_s": report.median(totals),
                "throughput_tok_s": new_tokens / report.median(totals),
                "gen_kv_bytes": kv[i],
                "ttft_all_s": ttft[i],
                "decode_ms_all": [1e3 * t for t in decode[i]],
            }
        )
    return out


def main(argv=None) -> None:
    parser = report.common_args(__doc__.splitlines()[0])
    parser.add_argument("--configs", default=SEED_CONFIGS, help="comma-separated policy names (+ :key=value options)")
    parser.add_argument("--extra", default="", help="configs appended to --configs (e.g. the best splits)")
    parser.add_argument("--texts", default="wikitext,pg19,heldout", help="text groups/rows, see benchmarks/data.py")
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per text row in the PPL pass")
    parser.add_argument("--step", type=int, default=1, help="tokens per forward after the prefix (1 = StreamingLLM)")
    parser.add_argument("--prompt", type=int, default=512, help="prompt tokens for TTFT")
    parser.add_argument("--new", type=int, default=64, help="generated tokens per timing run")
    parser.add_argument("--reps", type=int, default=3, help="timing repetitions (round-robin over configs)")
    parser.add_argument("--name", default="ppl", help="output file stem")
    args = parser.parse_args(argv)
    if args.smoke:
        args.configs = args.configs if args.configs != SEED_CONFIGS else SMOKE_CONFIGS
        args.tokens, args.prompt, args.new, args.reps = min(args.tokens, 256), 96, 8, 1
    report.apply_smoke(args)
    start = report.run_start()
    configs = [parse_config(c) for c in (args.configs + "," + args.extra).split(",") if c.strip()]
    rows = expand_texts(args.texts)
    with Pool(make_specs(args, configs), inline=args.inline) as pool:
        quality = ppl_pass(pool, rows, args.tokens, args.step)
        timing = timing_pass(pool, rows[0], args.prompt, args.new, args.reps)
        memory = [pool.call(i, "memory") for i in range(len(configs))]
    results = [{**q, **t, **m} for q, t, m in zip(quality, timing, memory)]
    out = report.out_dir(args)
    table = render(results, rows, args)
    (out / f"{args.name}.md").write_text(table)
    report.write_json(
        out / f"{args.name}.json",
        {"meta": report.meta(args, start), "args": vars(args), "rows": rows, "results": results},
    )
    plot(out / f"{args.name}.png", results)
    print(table)


def columns_for(groups: list[str], cuda: bool) -> list[str]:
    mem = ["KV (MB)", "Peak Mem (GB)"] if cuda else ["KV (MB)", "Peak RSS (GB)"]
    return (
        ["Config"]
        + [GROUP_TITLES.get(g, f"{g} PPL") for g in groups]
        + ["Total Time (s)", "Avg Attn (ms)", "TTFT (s)", "TPOT (ms)", "Throughput (tok/s)"]
        + mem
    )


def render(results: list[dict], rows: list[str], args) -> str:
    groups = list(dict.fromkeys(group_of(r) for r in rows))
    cuda = "cuda_peak_bytes" in results[0]
    table_rows = []
    for r in results:
        peak = r["cuda_peak_bytes"] if cuda else r["peak_rss_bytes"]
        table_rows.append(
            [r["config"]]
            + [r["group_ppl"][g] for g in groups]
            + [
                round(r["ppl_time_s"], 1),
                r["attn_ms"],
                r["ttft_s"],
                r["tpot_ms"],
                r["throughput_tok_s"],
                r["kv_bytes"] / 2**20,
                peak / 2**30,
            ]
        )
    text = report.markdown_table(columns_for(groups, cuda), table_rows)
    base = full_cache_result(results)
    if base is not None:
        ratio_rows = [
            [r["config"]]
            + percent_above(r, base, groups)
            + [r["tpot_ms"] / base["tpot_ms"], r["ttft_s"] / base["ttft_s"], r["kv_bytes"] / base["kv_bytes"]]
            for r in results
        ]
        cols = (
            ["Config"]
            + [f"{GROUP_TITLES.get(g, g)} vs base (%)" for g in groups]
            + ["TPOT / base", "TTFT / base", "KV / base"]
        )
        text += "\nSame run, relative to the full cache:\n\n" + report.markdown_table(cols, ratio_rows)
    text += (
        f"\n{args.tokens} tokens per text row, {'one token' if args.step == 1 else f'{args.step} tokens'} per "
        f"forward after the eviction-free prefix; rows: {', '.join(rows)}. Timing: {args.prompt}-token prompt + "
        f"{args.new} greedy tokens, {args.reps} interleaved reps, medians. Model: {args.model}.\n"
    )
    return text


def full_cache_result(results: list[dict]) -> dict | None:
    """The full cache's result with default options, which ratios are taken against (None if the run has none)."""
    return next((r for r in results if r["policy"] in ("baseline", "full") and not r["options"]), None)


def percent_above(result: dict, base: dict, groups: list[str]) -> list[float]:
    """PPL of ``result`` above ``base``'s, in %, per text group."""
    return [100 * (result["group_ppl"][g] / base["group_ppl"][g] - 1) for g in groups]


def plot(path, results: list[dict]) -> None:
    """PPL per group as a bar-like line per config is unreadable; plot KV MB vs PPL (quality/memory trade-off)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(results[0]["group_ppl"])
    fig, axes = plt.subplots(1, len(groups), figsize=(4.5 * len(groups), 4), squeeze=False)
    for ax, g in zip(axes[0], groups):
        for r in results:
            ax.scatter(r["kv_bytes"] / 2**20, r["group_ppl"][g], label=r["config"])
        ax.set_xlabel("KV cache per sequence (MB)")
        ax.set_ylabel("perplexity")
        ax.set_title(GROUP_TITLES.get(g, g))
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
