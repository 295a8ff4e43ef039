"""Equal bytes: the best quality a session gets from a byte budget, across policies, splits and KV storage precisions.

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.bytes                      # budgets of 256 and 512 16-bit tokens
    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.bytes --budgets 256 --kv-dtypes bf16,int8 --texts wikitext
    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.bytes --smoke --out /tmp/bench  # tiny model, seconds

A budget of ``N`` tokens is the bytes a full session of ``h2o_4_{N/2}_{N}_bf16`` holds (``N`` tokens of 16-bit keys
and values plus the slack of 64, with their scores and bookkeeping; :func:`h2o_cache.budget.session_nbytes`). Every
family (StreamingLLM with 4 sinks; H2O with 4 sinks and a recent window of C/8 or C/2) in every ``--kv-dtypes``
storage gets the largest capacity C, a multiple of 16, whose full session fits in that budget; the full cache in
each precision is the unbounded reference. Quality is teacher-forced as in :mod:`benchmarks.ppl` (``--step`` tokens
per forward after the eviction-free prefix): PPL, and against the full cache's next-token distribution at every
scored position, KL(full || config) and top-1 agreement. The full cache writes its log-probs (fp16) to a temporary
folder (``$TMPDIR``; vocab x tokens x rows x 2 bytes, ~1 GB at the defaults) that the other configs read. TPOT is
timed interleaved with ``full`` in the same worker pool (:func:`benchmarks.ppl.timing_pass`).

The best config per budget is the lowest mean PPL-above-full over the tuning texts (WikiText, PG-19); the held-out
book is shown, never used for the choice. One worker pool per budget (plus one for the references), so memory
stays at about 13 models at the defaults.
"""

from __future__ import annotations

import math
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, PretrainedConfig

from benchmarks import report
from benchmarks.data import HELDOUT, expand_texts, group_of
from benchmarks.ppl import GROUP_TITLES, make_specs, percent_above, ppl_pass, timing_pass
from benchmarks.runner import SMOKE_MODEL, tiny_model
from benchmarks.workers import Pool
from h2o_cache import CachePolicy
from h2o_cache.budget import session_nbytes
from h2o_cache.loading import resolve_device, resolve_dtype, resolve_model_path
from h2o_cache.policy import DEFAULT_SLACK

DEFAULT_BUDGETS = "256,512"
SMOKE_BUDGETS = "32,64"
DEFAULT_KV_DTYPES = "bf16,int8,k8v4,int4"
DEFAULT_REFERENCES = "full,full_int8,full_k8v4,full_int4"
SLACK = 64
SINKS = 4
STEP = 16
"""Capacities are multiples of this (so C/8 and C/2 are whole tokens)."""
FAMILIES = {"streaming": "StreamingLLM", "h2o_r8": "H2O, recent C/8", "h2o_r2": "H2O, recent C/2"}
TUNING_GROUPS = ("wikitext", "pg19")
MARKERS = {"streaming": "o", "h2o_r8": "s", "h2o_r2": "^", "full": "*"}


@dataclass(frozen=True)
class Candidate:
    """One row: a policy name, its family and storage, the capacity it got and the bytes of its full session
    (``budget`` tokens it was sized for, ``None`` for the unbounded references)."""

    name: str
    family: str
    kv_dtype: str
    capacity: int | None
    nbytes: int
    budget: int | None


def policy_name(family: str, capacity: int, kv_dtype: str) -> str:
    if family == "streaming":
        return f"streaming_{SINKS}_{capacity}_{kv_dtype}"
    recent = capacity // 8 if family == "h2o_r8" else capacity // 2
    return f"h2o_{SINKS}_{recent}_{capacity}_{kv_dtype}"


def parse_policy(name: str) -> CachePolicy:
    return CachePolicy.parse(name, slack=SLACK)


def budget_bytes(config: PretrainedConfig, dtype: torch.dtype, n_tokens: int) -> int:
    """Bytes of a full session holding ``n_tokens`` 16-bit tokens plus the slack (an H2O one: scores included)."""
    return session_nbytes(config, parse_policy(f"h2o_{SINKS}_{n_tokens // 2}_{n_tokens}_bf16"), dtype)


def largest_capacity(
    config: PretrainedConfig, dtype: torch.dtype, family: str, kv_dtype: str, budget: int
) -> int | None:
    """The largest multiple of :data:`STEP` whose full session fits in ``budget`` bytes (``None``: not even one).
    Session bytes grow with capacity, so the first that does not fit ends the search."""

    def fits(capacity: int) -> bool:
        return session_nbytes(config, parse_policy(policy_name(family, capacity, kv_dtype)), dtype) <= budget

    if not fits(STEP):
        return None
    capacity = STEP
    while fits(capacity + STEP):
        capacity += STEP
    return capacity


def candidates(config: PretrainedConfig, dtype: torch.dtype, n_tokens: int, kv_dtypes: list[str]) -> list[Candidate]:
    """Every family x storage that fits a budget of ``n_tokens`` 16-bit tokens, at its largest capacity."""
    budget = budget_bytes(config, dtype, n_tokens)
    out = []
    for family in FAMILIES:
        for kv_dtype in kv_dtypes:
            capacity = largest_capacity(config, dtype, family, kv_dtype, budget)
            if capacity is not None:
                name = policy_name(family, capacity, kv_dtype)
                out.append(
                    Candidate(
                        name, family, kv_dtype, capacity, session_nbytes(config, parse_policy(name), dtype), n_tokens
                    )
                )
    return out


def references(config: PretrainedConfig, dtype: torch.dtype, names: list[str], n_tokens: int) -> list[Candidate]:
    """The unbounded full caches, their bytes those of a session that has seen ``n_tokens`` tokens."""
    out = []
    for name in names:
        policy = parse_policy(name)
        if policy.kind != "full":
            raise ValueError(f"reference rows are full caches; got {name!r}")
        out.append(
            Candidate(
                policy.name,
                "full",
                policy.kv_dtype,
                None,
                session_nbytes(config, policy, dtype, n_tokens=n_tokens),
                None,
            )
        )
    return out


def model_config(args) -> tuple[PretrainedConfig, torch.dtype]:
    """The model's config and compute dtype as the workers will load them (budgets need no forward)."""
    if args.model == SMOKE_MODEL:
        model = tiny_model()[0]
        return model.config, model.dtype
    dtype = resolve_dtype(args.dtype, resolve_device(args.device))
    return AutoConfig.from_pretrained(resolve_model_path(args.model)), dtype


def measure(args, rows: list[str], group: list[Candidate], reference_dir: Path, write: bool) -> list[dict]:
    """Quality and TPOT of ``full`` (index 0: writes the reference log-probs when ``write``, else checks itself
    against them) and ``group``, in one worker pool."""
    options = {} if SLACK == DEFAULT_SLACK else {"slack": SLACK}
    full = Candidate("full", "full", "auto", None, 0, None)
    members = [full] + [c for c in group if c.name != "full"]
    specs = make_specs(args, [(c.name, options) for c in members])
    with Pool(specs, inline=args.inline) as pool:
        for i in range(len(specs)):
            pool.call(i, "set_reference", path=str(reference_dir), write=write and i == 0)
        quality = ppl_pass(pool, rows, args.tokens, args.step, desc=f"quality ({len(specs)} configs)")
        divergence = [pool.call(i, "divergence_result") for i in range(len(specs))]
        timing = timing_pass(pool, rows[0], args.prompt, args.new, args.reps)
    results = []
    for c, q, d, t in zip(members, quality, divergence, timing):
        results.append(
            {
                "config": c.name,
                "family": c.family,
                "kv_dtype": c.kv_dtype,
                "capacity": c.capacity,
                "session_bytes": c.nbytes,
                "budget_tokens": c.budget,
                **q,
                **divergence_summary(rows, d),
                "tpot_ms": t["tpot_ms"],
                "tpot_ratio": t["tpot_ms"] / timing[0]["tpot_ms"],
            }
        )
    return results


def divergence_summary(rows: list[str], raw: dict) -> dict:
    """KL and top-1 agreement (%) per text group (mean over its positions) and their mean over the groups."""
    kl: dict[str, list[float]] = {}
    top1: dict[str, list[float]] = {}
    for row, kl_row, top1_row in zip(rows, raw["kl"], raw["top1"]):
        kl.setdefault(group_of(row), []).extend(kl_row)
        top1.setdefault(group_of(row), []).extend(top1_row)
    group_kl = {g: statistics.fmean(v) for g, v in kl.items()}
    group_top1 = {g: 100 * statistics.fmean(v) for g, v in top1.items()}
    return {
        "group_kl": group_kl,
        "group_top1": group_top1,
        "kl_mean": statistics.fmean(group_kl.values()),
        "top1_mean": statistics.fmean(group_top1.values()),
    }


def add_quality(results: list[dict], base: dict, groups: list[str]) -> None:
    """% above the full cache's PPL per group, its mean over all groups and over the tuning groups only."""
    tuning = [g for g in groups if g in TUNING_GROUPS]
    for r in results:
        above = dict(zip(groups, percent_above(r, base, groups)))
        r["group_above_pct"] = above
        r["above_mean_pct"] = statistics.fmean(above.values())
        r["tuning_above_pct"] = statistics.fmean(above[g] for g in tuning) if tuning else math.nan


def best_per_budget(results: list[dict]) -> dict[int, str]:
    """Per budget, the config with the lowest mean PPL-above-full on the tuning texts (held-out never looked at)."""
    best = {}
    for budget in dict.fromkeys(r["budget_tokens"] for r in results if r["budget_tokens"] is not None):
        mine = [r for r in results if r["budget_tokens"] == budget and not math.isnan(r["tuning_above_pct"])]
        if mine:
            best[budget] = min(mine, key=lambda r: r["tuning_above_pct"])["config"]
    return best


def columns_for(groups: list[str]) -> list[str]:
    return (
        ["Config", "kv_dtype", "Capacity", "Session (MB)"]
        + [c for g in groups for c in (GROUP_TITLES.get(g, f"{g} PPL"), f"{g} vs full (%)")]
        + ["Mean vs full (%)", "KL mean (nats)", "Top-1 (%)", "TPOT / full"]
    )


def table(results: list[dict], groups: list[str], best: str | None = None) -> str:
    rows = []
    for r in results:
        label = f"**{r['config']}**" if r["config"] == best else r["config"]
        cells = [label, r["kv_dtype"], "-" if r["capacity"] is None else str(r["capacity"]), r["session_bytes"] / 2**20]
        for g in groups:
            cells += [r["group_ppl"][g], f"{r['group_above_pct'][g]:+.2f}"]
        rows.append(cells + [f"{r['above_mean_pct']:+.2f}", f"{r['kl_mean']:.3g}", r["top1_mean"], r["tpot_ratio"]])
    return report.markdown_table(columns_for(groups), rows)


def render(
    results: list[dict], budgets: dict[int, int], best: dict[int, str], groups: list[str], model_dtype: str, args
) -> str:
    base_kl = next(r["kl_mean"] for r in results if r["config"] == "full")
    tuning = [g for g in groups if g in TUNING_GROUPS]
    text = "# Equal bytes\n"
    for n_tokens, nbytes in budgets.items():
        mine = [r for r in results if r["budget_tokens"] == n_tokens]
        text += f"\n## Budget: {n_tokens} 16-bit tokens = {nbytes / 2**20:.2f} MB per session\n\n" + table(
            mine, groups, best.get(n_tokens)
        )
        if n_tokens in best:
            winner = next(r for r in mine if r["config"] == best[n_tokens])
            text += (
                f"\nBest on the tuning texts ({', '.join(tuning)}): **{winner['config']}**, "
                f"{winner['tuning_above_pct']:+.2f}% above full there"
                + "".join(f"; {g} {winner['group_above_pct'][g]:+.2f}%" for g in groups if g not in TUNING_GROUPS)
                + ".\n"
            )
    refs = [r for r in results if r["budget_tokens"] is None]
    text += f"\n## No byte limit (sessions of {args.tokens} tokens)\n\n" + table(refs, groups)
    heldout = [g for g in groups if g not in TUNING_GROUPS]
    text += (
        f"\nEach budget is the bytes of a full `h2o_{SINKS}_N/2_N_bf16` session (N 16-bit tokens + slack {SLACK}, "
        f"scores and positions included) on {args.model} computing in {model_dtype}; each "
        f"family x kv_dtype gets the largest capacity (multiple of {STEP}) whose full session (capacity + slack "
        f"{SLACK}) fits, from `h2o_cache.budget.session_nbytes`. Session (MB): that full session; for the unbounded "
        f"rows, a session of {args.tokens} tokens. Teacher-forced on {args.tokens} tokens per text row "
        f"({', '.join(expand_texts(args.texts))}), {args.step} tokens per forward after the eviction-free prefix; "
        f"PPL per group, and vs full (%) = PPL above the full cache's (model-dtype storage). KL mean: KL(full || "
        f"config) of the next-token distribution in nats, mean over each group's scored positions, then over the "
        f"groups (floor: the full cache against its own fp16-stored log-probs reads {base_kl:.2g}); Top-1: the "
        f"config's argmax equals the full cache's, same averaging. TPOT / full: median decode step "
        f"over the full cache's in the same worker pool, {args.prompt}-token prompt + {args.new} tokens, {args.reps} "
        f"interleaved rep(s). Best (bold): lowest mean PPL above full on {', '.join(tuning) or 'no tuning text'}"
        + (f"; {', '.join(heldout)} shown, never used for the choice" if heldout else "")
        + ".\n"
    )
    return text


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both axes (fewer bytes and lower y), by increasing x."""
    front, best_y = [], math.inf
    for x, y in sorted(points):
        if y < best_y:
            front.append((x, y))
            best_y = y
    return front


def plot(path: Path, results: list[dict], budgets: dict[int, int]) -> None:
    """Quality against session MB: mean % above full PPL and mean KL, marker per family, colour per kv_dtype,
    budgets as dashed lines, the Pareto front as a grey line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kv_dtypes = list(dict.fromkeys(r["kv_dtype"] for r in results))
    colours = {d: plt.get_cmap("tab10")(i) for i, d in enumerate(kv_dtypes)}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, ylabel in zip(
        axes, ("above_mean_pct", "kl_mean"), ("mean PPL above full (%)", "mean KL(full || config) (nats)")
    ):
        for r in results:
            ax.scatter(
                r["session_bytes"] / 2**20,
                r[key],
                marker=MARKERS[r["family"]],
                color=colours[r["kv_dtype"]],
                s=60 if r["family"] == "full" else 30,
            )
        front = pareto([(r["session_bytes"] / 2**20, r[key]) for r in results])
        ax.plot(*zip(*front), color="grey", linewidth=1, zorder=0, label="Pareto front")
        for n_tokens, nbytes in budgets.items():
            ax.axvline(nbytes / 2**20, color="grey", linestyle="--", linewidth=0.8)
            ax.annotate(
                f"budget {n_tokens}",
                (nbytes / 2**20, 0.02),
                xycoords=("data", "axes fraction"),
                fontsize=7,
                ha="right",
                va="bottom",
                rotation=90,
            )
        ax.set_yscale("symlog", linthresh=1e-4 if key == "kl_mean" else 1.0)  # spans orders of magnitude, has 0
        ax.margins(y=0.15)
        if key == "kl_mean":
            ax.set_ylim(bottom=0)
        ax.set_xscale("log")
        ax.set_xlabel("session KV bytes (MB)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    handles = [
        plt.Line2D([], [], linestyle="", marker=m, color="black", label=FAMILIES.get(f, "full cache"))
        for f, m in MARKERS.items()
    ]
    handles += [
        plt.Line2D([], [], linestyle="", marker="o", color=c, label="auto (model dtype)" if d == "auto" else d)
        for d, c in colours.items()
    ]
    handles += [plt.Line2D([], [], color="grey", label="Pareto front")]
    axes[1].legend(handles=handles, fontsize=7)
    fig.suptitle("Quality against bytes per session")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    parser = report.common_args(__doc__.splitlines()[0])
    parser.add_argument("--budgets", default=DEFAULT_BUDGETS, help="budgets in 16-bit tokens (bytes of N such tokens)")
    parser.add_argument("--kv-dtypes", default=DEFAULT_KV_DTYPES, help="storage precisions tried at each budget")
    parser.add_argument("--references", default=DEFAULT_REFERENCES, help="unbounded rows (full caches); 'full' first")
    parser.add_argument("--texts", default="wikitext,pg19,heldout", help="text groups/rows, see benchmarks/data.py")
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per text row")
    parser.add_argument("--step", type=int, default=16, help="tokens per forward after the eviction-free prefix")
    parser.add_argument("--prompt", type=int, default=512, help="prompt tokens before the timed decode steps")
    parser.add_argument("--new", type=int, default=16, help="generated tokens per timing run")
    parser.add_argument("--reps", type=int, default=1, help="timing repetitions (round-robin over configs)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.budgets = SMOKE_BUDGETS if args.budgets == DEFAULT_BUDGETS else args.budgets
        args.tokens, args.prompt, args.new = min(args.tokens, 256), min(args.prompt, 64), min(args.new, 4)
    report.apply_smoke(args)
    start = report.run_start()
    kv_dtypes = [d.strip() for d in args.kv_dtypes.split(",") if d.strip()]
    ref_names = [n.strip() for n in args.references.split(",") if n.strip()]
    if not ref_names or parse_policy(ref_names[0]).name != "full":
        parser.error("--references must start with 'full' (the rows every ratio is taken against)")
    rows = expand_texts(args.texts)
    groups = list(dict.fromkeys(group_of(r) for r in rows))
    config, dtype = model_config(args)
    budgets = {int(n): budget_bytes(config, dtype, int(n)) for n in args.budgets.split(",") if n.strip()}
    plan = [references(config, dtype, ref_names, args.tokens)] + [
        candidates(config, dtype, n, kv_dtypes) for n in budgets
    ]
    with tempfile.TemporaryDirectory(prefix="h2o_bytes_") as scratch:
        runs = [measure(args, rows, group, Path(scratch), write=k == 0) for k, group in enumerate(plan)]
    base = runs[0][0]
    checks = [
        {
            "pool": k,
            "kl_mean": run[0]["kl_mean"],
            "top1_mean": run[0]["top1_mean"],
            "ppl_ratio": {g: run[0]["group_ppl"][g] / base["group_ppl"][g] for g in groups},
        }
        for k, run in enumerate(runs[1:], start=1)
    ]  # later pools' full caches against the written reference
    for ref, r in zip(plan[0], runs[0]):  # reference rows: bytes of a session of --tokens tokens
        r.update(config=ref.name, family="full", kv_dtype=ref.kv_dtype, session_bytes=ref.nbytes)
    results = [r for run in runs[1:] for r in run[1:]] + runs[0]
    add_quality(results, base, groups)
    best = best_per_budget(results)
    out = report.out_dir(args)
    text = render(results, budgets, best, groups, str(dtype).removeprefix("torch."), args)
    (out / "bytes.md").write_text(text)
    report.write_json(
        out / "bytes.json",
        {
            "meta": report.meta(args, start),
            "args": vars(args),
            "rows": rows,
            "groups": groups,
            "heldout_rows": [r for r in rows if r in HELDOUT],
            "budgets_bytes": budgets,
            "best": best,
            "slack": SLACK,
            "model_dtype": str(dtype),
            "results": results,
            "reference_checks": checks,
        },
    )
    plot(out / "bytes.png", results, budgets)
    print(text)


if __name__ == "__main__":
    main()
