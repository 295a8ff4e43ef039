"""Ablations that decide the defaults, on the tuning texts only (WikiText-2 + the three tuning books; the held-out
book is never read here).

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.ablate --step 16 --tokens 1536  # ~25 min, busy 2-core CPU
    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.ablate --smoke --out /tmp/bench

Phase 1: score mode (sum vs mean) x recent/heavy split at capacity 256 (sink 4), StreamingLLM at the same budget
and the full cache as references. The best split = lowest mean tuning NLL (the average of the WikiText and PG-19
NLLs). Phase 2, around the best capacity-256 split: sinks 8 vs 4 and rolling off.
Phase 3: slack 0 / 16 / 64 at one token per forward (slack only matters there), quality and TPOT.
"""

from __future__ import annotations

from benchmarks import report
from benchmarks.data import HELDOUT, expand_texts
from benchmarks.ppl import make_specs, ppl_pass, timing_pass
from benchmarks.workers import Pool

TUNING_GROUPS = ("wikitext", "pg19")


def phase1_grid(smoke: bool) -> list[tuple[str, dict]]:
    """Capacity 256 (sink 4): recent 32..192 with mean scores, 32/128/192 with summed scores. The split at
    capacity 512 is swept in the main table run (benchmarks/README.md says why)."""
    if smoke:
        return [
            ("baseline", {}),
            ("streaming_4_64", {}),
            ("h2o_4_16_64", {"score_mode": "sum"}),
            ("h2o_4_16_64", {"score_mode": "mean"}),
            ("h2o_4_32_64", {"score_mode": "mean"}),
        ]
    grid = [("baseline", {}), ("streaming_4_256", {})]
    grid += [(f"h2o_4_{r}_256", {"score_mode": "mean"}) for r in (32, 64, 128, 192)]
    grid += [(f"h2o_4_{r}_256", {"score_mode": "sum"}) for r in (32, 128, 192)]
    return grid


def tuning_nll(result: dict) -> float:
    return sum(result["group_nll"][g] for g in TUNING_GROUPS) / len(TUNING_GROUPS)


def capacity_of(policy: str) -> int | None:
    return int(policy.split("_")[-1]) if policy.startswith(("h2o", "streaming")) else None


def best_h2o(results: list[dict], capacity: int) -> dict:
    candidates = [r for r in results if r["policy"].startswith("h2o") and capacity_of(r["policy"]) == capacity]
    return min(candidates, key=tuning_nll)


def run(pool_specs, args, rows, step, tokens, desc) -> list[dict]:
    with Pool(pool_specs, inline=args.inline) as pool:
        return ppl_pass(pool, rows, tokens, step, desc=desc)


def main(argv=None) -> None:
    parser = report.common_args(__doc__.splitlines()[0])
    parser.add_argument("--texts", default="wikitext,pg19", help="tuning texts only; the held-out book is refused")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--step", type=int, default=1, help="tokens per forward after the prefix (phases 1-2)")
    parser.add_argument("--slack-tokens", type=int, default=640, help="tokens per row in phase 3 (one per forward)")
    parser.add_argument("--slack-texts", default="wikitext,moby", help="rows for phase 3")
    parser.add_argument("--workers", type=int, default=10, help="configs alive at once (memory: ~1 GB each)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.tokens, args.slack_tokens = min(args.tokens, 256), min(args.slack_tokens, 160)
    report.apply_smoke(args)
    rows = expand_texts(args.texts)
    if HELDOUT & set(rows) or HELDOUT & set(expand_texts(args.slack_texts)):
        parser.error(f"the held-out book ({', '.join(sorted(HELDOUT))}) must stay out of the ablations")
    start = report.run_start()

    grid = phase1_grid(args.smoke)
    phase1 = []
    for i in range(0, len(grid), args.workers):
        wave = grid[i : i + args.workers]
        phase1 += run(make_specs(args, wave), args, rows, args.step, args.tokens, f"phase1 {i // args.workers + 1}")
    caps = sorted({capacity_of(r["policy"]) for r in phase1 if r["policy"].startswith("h2o")})
    best = {cap: best_h2o(phase1, cap) for cap in caps}

    anchor = best[caps[0]]
    sink, recent, cap = (int(x) for x in anchor["policy"].split("_")[1:])
    phase2_grid = [
        (f"h2o_8_{recent}_{cap}", dict(anchor["options"])),
        (anchor["policy"], {**anchor["options"], "rolling": False}),
    ]
    phase2 = run(make_specs(args, phase2_grid), args, rows, args.step, args.tokens, "phase2")

    slack_rows = expand_texts(args.slack_texts)
    phase3_grid = [(anchor["policy"], {**anchor["options"], "slack": s}) for s in (0, 16, 64)]
    specs = make_specs(args, phase3_grid)
    with Pool(specs, inline=args.inline) as pool:
        phase3 = ppl_pass(pool, slack_rows, args.slack_tokens, 1, desc="phase3 slack")
        timing = timing_pass(
            pool,
            slack_rows[0],
            128 if args.smoke else 512,
            8 if args.smoke else 64,
            1 if args.smoke else 3,
            desc="phase3 timing",
        )
    phase3 = [{**q, **t} for q, t in zip(phase3, timing)]

    out = report.out_dir(args)
    text = render(phase1, phase2, phase3, best, rows, slack_rows, args)
    (out / "ablations.md").write_text(text)
    report.write_json(
        out / "ablations.json",
        {
            "meta": report.meta(args, start),
            "args": vars(args),
            "rows": rows,
            "slack_rows": slack_rows,
            "best": {str(c): r["config"] for c, r in best.items()},
            "phase1": phase1,
            "phase2": phase2,
            "phase3": phase3,
        },
    )
    print(text)


def _ppl_cols(results, groups):
    return [[r["config"]] + [r["group_ppl"][g] for g in groups] + [tuning_nll(r)] for r in results]


def render(phase1, phase2, phase3, best, rows, slack_rows, args) -> str:
    groups = list(TUNING_GROUPS)
    cols = ["Config", "Wikitext PPL", "PG-19 PPL", "mean NLL"]
    text = f"# Ablations (tuning texts: {', '.join(rows)}; {args.tokens} tokens per row, "
    text += f"{'one token' if args.step == 1 else f'{args.step} tokens'} per forward after the prefix)\n\n"
    text += "## Phase 1: score mode x recent/heavy split (sink 4)\n\n"
    text += report.markdown_table(cols, _ppl_cols(phase1, groups))
    text += (
        "\nBest split per capacity (lowest mean NLL): "
        + ", ".join(f"{c}: **{r['config']}**" for c, r in best.items())
        + "\n\n"
    )
    text += "## Phase 2: sinks and rolling around the best capacity-256 split\n\n"
    anchor = best[min(best)]
    text += report.markdown_table(cols, _ppl_cols([anchor] + phase2, groups))
    text += f"\n## Phase 3: slack (one token per forward, {args.slack_tokens} tokens, rows {', '.join(slack_rows)})\n\n"
    slack_groups = list(phase3[0]["group_ppl"])
    text += report.markdown_table(
        ["Config"] + [f"{g} PPL" for g in slack_groups] + ["TPOT (ms)", "Avg Attn (ms)"],
        [[r["config"]] + [r["group_ppl"][g] for g in slack_groups] + [r["tpot_ms"], r["attn_ms"]] for r in phase3],
    )
    return text


if __name__ == "__main__":
    main()
