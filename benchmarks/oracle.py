"""Selection headroom: the same bounded caches, evicting by the attention each token *will* receive (an oracle that
reads the full cache's future) instead of the attention it has received (H2O).

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.oracle                    # ~12 min on a busy 2-core CPU
    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.oracle --smoke --out /tmp/bench

A first pass feeds each text row through a cache that never evicts and records, every ``--step`` tokens, the
attention every token has received so far (per layer and KV head, summed over the group's query heads). The
attention a token receives from position t on is the final total minus the total at t; with a horizon h, the total
at t + h minus the total at t. An oracle run is then a normal teacher-forced pass of an H2O policy (same sinks,
recent window, capacity, slack and position rolling) whose layers rank eviction candidates by that future
attention. Nobody can serve with it, since it reads the future; it shows how far a better score could take a
given budget, and whether the gap to the full cache is one of choosing tokens or of having too few.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from tqdm import tqdm

from benchmarks import report
from benchmarks.data import expand_texts, group_of
from benchmarks.ppl import GROUP_TITLES, full_cache_result, make_specs, parse_config, percent_above, stream_summary
from benchmarks.runner import Session, Spec
from h2o_cache import CachePolicy, Scorer, make_cache

PAST = "past attention (H2O)"


@torch.inference_mode()
def attention_totals(session: Session, rows: list[str], n_tokens: int, step: int) -> torch.Tensor:
    """``(n_tokens // step + 1, rows, layers, kv_heads, n_tokens)`` fp32 (0.5 GB for SmolLM2, 5 rows of 2048 tokens
    and step 16): index ``b`` holds the attention each token has received from the queries before position
    ``b * step`` (zero for tokens not yet seen)."""
    ids = torch.tensor([session.tokens(row, n_tokens) for row in rows], device=session.device)
    cache = make_cache(session.model, CachePolicy.h2o(0, 1, n_tokens + 1, score_mode="sum", chunk_size=step))
    received = []
    for start in tqdm(range(0, n_tokens, step), desc="attention totals", unit="step"):
        session.model(input_ids=ids[:, start : start + step], past_key_values=cache, use_cache=True, logits_to_keep=1)
        scores = torch.stack([layer.slot("scores") for layer in cache.layers], dim=1).float().cpu()
        received.append(F.pad(scores, (0, n_tokens - scores.shape[-1])))
    return torch.stack([torch.zeros_like(received[0])] + received)


@dataclass
class FutureAttention(Scorer):
    """Ranks each slot by the attention its token receives after the cut (up to ``horizon`` tokens after it, or to
    the end of the text), from one layer's ``totals`` ``(n_tokens // step + 1, rows, kv_heads, n_tokens)``. Cuts
    fall on multiples of ``step`` when the capacity and slack are multiples of it; otherwise the last partial step
    counts as future. It reads no attention of its own, so the layers run plain SDPA."""

    totals: torch.Tensor
    step: int
    horizon: int | None
    needs_attention: ClassVar[bool] = False

    def rank(self, slots: dict[str, torch.Tensor], valid_seen: torch.Tensor) -> torch.Tensor:
        if slots["position"].shape[0] != self.totals.shape[1]:
            raise RuntimeError("the oracle expects every row to be cut at once (equal-length rows)")
        last = self.totals.shape[0] - 1
        now = int(valid_seen.min()) // self.step
        end = last if self.horizon is None else min(last, now + self.horizon // self.step)
        future = (self.totals[end] - self.totals[now]).to(slots["position"].device)
        return future.gather(-1, slots["position"].long())


def run_config(
    spec: Spec, rows: list[str], n_tokens: int, step: int, totals: torch.Tensor | None, horizon: int | None
) -> dict:
    """One teacher-forced pass; with ``totals``, every layer evicts by future attention."""
    session = Session(spec)
    scorers = None
    if totals is not None:
        scorers = [FutureAttention(totals[:, :, layer], step, horizon) for layer in range(totals.shape[2])]
    session.start_stream(rows, n_tokens, step=step, scorers=scorers)
    session.advance(n_tokens)
    return stream_summary(spec, rows, session.stream_result())


def oracle_label(horizon: int | None) -> str:
    return "future attention (oracle)" if horizon is None else f"future attention, next {horizon} (oracle)"


def main(argv=None) -> None:
    parser = report.common_args(__doc__.splitlines()[0])
    parser.add_argument("--configs", default="baseline,streaming_8_512,h2o_4_64_512,h2o_4_256_512")
    parser.add_argument("--texts", default="wikitext,pg19,heldout")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--step", type=int, default=16, help="tokens per forward after the prefix; the oracle's grain")
    parser.add_argument("--horizons", default="all,256", help="future windows the oracle reads ('all' = to the end)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.tokens, args.step = min(args.tokens, 256), 16
        if args.configs == parser.get_default("configs"):
            args.configs = "baseline,streaming_4_64,h2o_4_16_64"
        if args.horizons == parser.get_default("horizons"):
            args.horizons = "all,32"
    report.apply_smoke(args)
    if args.tokens % args.step:
        parser.error("--tokens must be a multiple of --step")
    start = report.run_start()
    rows = expand_texts(args.texts)
    horizons = [None if h.strip() == "all" else int(h) for h in args.horizons.split(",") if h.strip()]
    configs = [parse_config(c) for c in args.configs.split(",") if c.strip()]
    if ("baseline", {}) not in configs and ("full", {}) not in configs:
        parser.error("--configs must include baseline (the full cache the table compares with)")
    specs = make_specs(args, configs)
    totals = attention_totals(Session(specs[0]), rows, args.tokens, args.step)
    results = []
    for spec in tqdm(specs, desc="configs"):
        scored = CachePolicy.parse(spec.policy, **spec.options).needs_scores
        result = run_config(spec, rows, args.tokens, args.step, None, None)
        results.append({**result, "ranking": PAST if scored else None})
        for horizon in horizons if scored else []:
            result = run_config(spec, rows, args.tokens, args.step, totals, horizon)
            results.append({**result, "ranking": oracle_label(horizon), "horizon": horizon})
    out = report.out_dir(args)
    table = render(results, rows, args)
    (out / "oracle.md").write_text(table)
    plot(out / "oracle.png", results)
    report.write_json(
        out / "oracle.json", {"meta": report.meta(args, start), "args": vars(args), "rows": rows, "results": results}
    )
    print(table)


def columns_for(groups: list[str]) -> list[str]:
    titles = [GROUP_TITLES.get(g, f"{g} PPL") for g in groups]
    return ["Config", "Eviction ranking"] + titles + [f"{t} vs base (%)" for t in titles]


def render(results: list[dict], rows: list[str], args) -> str:
    groups = list(dict.fromkeys(group_of(r) for r in rows))
    base = full_cache_result(results)
    table_rows = [
        [r["config"], r["ranking"] or "-"] + [r["group_ppl"][g] for g in groups] + percent_above(r, base, groups)
        for r in results
    ]
    return (
        report.markdown_table(columns_for(groups), table_rows)
        + f"\n{args.tokens} tokens per text row, {args.step} tokens per forward after the eviction-free prefix; "
        f"rows: {', '.join(rows)}. Model: {args.model}. The oracle ranks candidates by the attention the full "
        "cache gives them after the cut; sinks, recent window, capacity and rolling are the policy's.\n"
    )


def plot(path, results: list[dict]) -> None:
    """PPL above the full cache (%) per text group: one bar per config and ranking."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = full_cache_result(results)
    groups = list(base["group_ppl"])
    bounded = [r for r in results if r is not base]
    fig, ax = plt.subplots(figsize=(2.2 + 1.6 * len(groups) * len(bounded) / 4, 4.2))
    width = 0.8 / len(bounded)
    for i, r in enumerate(bounded):
        label = r["config"] + (f", {r['ranking']}" if r["ranking"] else "")
        xs = [g + (i - (len(bounded) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, percent_above(r, base, groups), width, label=label)
    ax.axhline(1.0, color="black", linestyle="--", linewidth=0.8, label="+1%")
    ax.set_xticks(range(len(groups)), [GROUP_TITLES.get(g, g) for g in groups])
    ax.set_ylabel("PPL above the full cache (%)")
    ax.set_title("Past vs future attention as the eviction ranking")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
