"""Weight precisions side by side: perplexity, decode TPOT, TTFT and weight bytes per `load_model` dtype (issue 17).

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.weights                     # SmolLM2, ~15 min on a busy 2-core CPU
    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.weights --smoke --out /tmp/bench

Every config is a model in this one process (no workers), driven through :class:`benchmarks.runner.Session`:
teacher-forced PPL on the full cache (chunked eviction-free prefix, ``--step`` tokens per forward; the configs take
turns every 64 tokens), then for each context a prefill and greedy decode of ``--new`` tokens, the configs taking
turns token by token, so that the machine's noise hits them alike. Ratios are to the first config at the same
context, from the same run.

A config is a `load_model` dtype (``fp32``, ``bf16``, ``int8``, ``int4``) or a weight-only variant that shows why the
defaults are what they are (:mod:`h2o_cache.weights`): ``int8:act=bf16`` (a bf16 model: no casts around the
kernels), ``int4:head=int4`` (the output projection in int4 too; ``head=dense`` leaves it as loaded),
``int4:group=64``. Decode timing runs each config under every ``--policies`` cache (default: the full cache and the
server's default policy and KV storage); PPL is the full cache's.
"""

from __future__ import annotations

from unittest import mock

import torch

from benchmarks import report, runner
from benchmarks.ppl import parse_config, ppl_pass, timing_pass
from benchmarks.runner import Session, Spec
from h2o_cache.loading import DTYPES, WEIGHT_DTYPES, load_model, resolve_dtype
from h2o_cache.weights import (
    INT4_GROUP_SIZE,
    OUTPUT_PRECISION,
    Int4WeightLinear,
    Int8WeightLinear,
    quantize_weights,
    weight_nbytes,
)

CONFIGS = "fp32,bf16,int8,int4,int8:act=bf16,int4:act=bf16,int4:head=int4,int4:group=64"
SMOKE_CONFIGS = "fp32,bf16,int8,int4,int4:act=bf16"
POLICIES = "full,h2o_4_280_560_k8v4"
SMOKE_POLICIES = "full,h2o_4_8_32_k8v4"
SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


class InProcess:
    """The two calls `ppl_pass` / `timing_pass` make of a worker pool, on sessions held in this process."""

    def __init__(self, sessions: list[Session]):
        self.sessions = sessions
        self.specs = [s.spec for s in sessions]

    def call(self, i: int, method: str, **kwargs):
        return getattr(self.sessions[i], method)(**kwargs)


def build(config: str, args) -> tuple[torch.nn.Module, object, dict]:
    """(model, tokenizer, what it is) for one config string."""
    precision, options = parse_config(config)
    unknown = set(options) - {"act", "head", "group"}
    if precision not in (*DTYPES, *WEIGHT_DTYPES) or unknown:
        raise ValueError(f"bad config {config!r}: a load_model dtype, then :act= :head= :group= for int8 / int4")
    weight_only = precision in WEIGHT_DTYPES
    if options and not weight_only:
        raise ValueError(f"{config!r}: options are for the weight-only int8 / int4")
    head = options.get("head", OUTPUT_PRECISION if weight_only else None)
    group = int(options.get("group", INT4_GROUP_SIZE))
    if args.smoke:
        model, tokenizer = runner.tiny_model()
        model = model.to(resolve_dtype(options.get("act", precision), "cpu"))
    elif weight_only and options:  # a variant: loaded dense in its compute dtype, quantized below with its choices
        act = options.get("act", SHORT[resolve_dtype(precision, args.device)])
        model, tokenizer = load_model(args.model, device=args.device, dtype=act)
    else:  # what H2O_DTYPE=<precision> serves
        model, tokenizer = load_model(args.model, device=args.device, dtype=precision)
    if weight_only and (args.smoke or options):
        model = quantize_weights(model, precision, group_size=group, output=None if head == "dense" else head)
    check(model, precision, head, group)
    described = {
        "weights": precision,
        "activations": SHORT[model.dtype],
        "lm_head": head or precision,
        "group": group if precision == "int4" else None,
    }
    return model, tokenizer, described


def check(model, precision: str, head: str | None, group: int) -> None:
    """The model is what its row will say (a variant quantized twice would silently be the default)."""
    kinds = {Int8WeightLinear: "int8", Int4WeightLinear: "int4"}
    out = model.get_output_embeddings()
    projection = model.model.layers[0].mlp.down_proj
    if precision in WEIGHT_DTYPES:
        assert kinds.get(type(projection)) == precision, (precision, projection)
        assert kinds.get(type(out), "dense") == (head or "dense"), (head, out)
        assert precision != "int4" or projection.group_size == group, (group, projection)
    else:
        assert type(projection) is torch.nn.Linear and type(out) is torch.nn.Linear


def session(model, tokenizer, spec: Spec) -> Session:
    """A runner Session around a model built here (Session loads by name, and the variants have none)."""
    built = mock.Mock(return_value=(model, tokenizer))
    with mock.patch.object(runner, "load_model", built), mock.patch.object(runner, "tiny_model", built):
        made = Session(spec)
    assert made.model is model
    return made


def main(argv=None) -> None:
    parser = report.common_args(__doc__.splitlines()[0])
    parser.add_argument("--configs", default=CONFIGS, help="the first is the reference for the ratios")
    parser.add_argument("--policies", default=POLICIES, help="caches the decode timing runs under")
    parser.add_argument("--text", default="wikitext", help="text row for PPL and the prompts")
    parser.add_argument("--tokens", type=int, default=1024, help="tokens in the PPL pass")
    parser.add_argument("--step", type=int, default=16, help="tokens per forward after the prefix")
    parser.add_argument("--contexts", default="256,1024", help="prompt lengths for the decode timing")
    parser.add_argument("--new", type=int, default=32, help="greedy tokens per timing run")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args(argv)
    recorded = dict(vars(args))
    configs = SMOKE_CONFIGS if args.smoke and args.configs == CONFIGS else args.configs
    policies = SMOKE_POLICIES if args.smoke and args.policies == POLICIES else args.policies
    tokens, contexts, new, reps = args.tokens, [int(c) for c in args.contexts.split(",")], args.new, args.reps
    if args.smoke:
        tokens, contexts, new, reps = 128, [32, 64], 4, 1
    report.apply_smoke(args)
    args.device = args.device or "cpu"  # the weight-only kernels are the CPU's
    start = report.run_start()
    torch.set_num_threads(args.threads)
    labels = [c.strip() for c in configs.split(",") if c.strip()]
    policies = ["full"] + [
        p.strip() for p in policies.split(",") if p.strip() and p.strip() not in ("full", "baseline")
    ]
    sessions, results = [], []  # sessions: config-major, one per policy, sharing the config's model
    for label in labels:
        model, tokenizer, what = build(label, args)
        for policy in policies:
            spec = Spec(policy, args.model, device=args.device, threads=args.threads, data_dir=args.data_dir)
            sessions.append(session(model, tokenizer, spec))
        results.append({"config": label, **what, "weight_bytes": weight_nbytes(model), "timing": {}})
    full = InProcess(sessions[:: len(policies)])
    quality = ppl_pass(full, [args.text], tokens, args.step)
    for r, q in zip(results, quality):
        r.update(ppl=q["ppl"][args.text], ppl_time_s=q["ppl_time_s"])
    everyone = InProcess(sessions)
    for ctx in contexts:
        timing = timing_pass(everyone, args.text, ctx, new, reps, desc=f"context {ctx}")
        for i, t in enumerate(timing):
            cell = {k: v for k, v in t.items() if k != "gen_kv_bytes"}
            results[i // len(policies)]["timing"].setdefault(policies[i % len(policies)], {})[str(ctx)] = cell
    base = results[0]
    for r in results:
        r["ppl_vs_base"] = r["ppl"] / base["ppl"] - 1
        r["bytes_vs_base"] = r["weight_bytes"]["per_token"] / base["weight_bytes"]["per_token"]
        for policy, by_ctx in r["timing"].items():
            for ctx, t in by_ctx.items():
                t["tpot_ratio"] = t["tpot_ms"] / base["timing"][policy][ctx]["tpot_ms"]
    out = report.out_dir(args)
    text = render(results, labels[0], policies, contexts, args, tokens, new, reps)
    (out / "weights.md").write_text(text)
    report.write_json(
        out / "weights.json",
        {
            "meta": report.meta(args, start),
            "args": recorded,
            "policies": policies,
            "contexts": contexts,
            "results": results,
        },
    )
    print(text)


def render(results: list[dict], base: str, policies: list[str], contexts: list[int], args, tokens, new, reps) -> str:
    cols = ["Config", "Weights", "Activations", "lm_head", "MB read / token", "Resident MB", "PPL", "PPL vs base"]
    rows = []
    for r in results:
        weights = r["weights"] + (f" g{r['group']}" if r["group"] else "")
        rows.append(
            [r["config"], weights, r["activations"], r["lm_head"]]
            + [r["weight_bytes"]["per_token"] / 1e6, r["weight_bytes"]["total"] / 1e6, f"{r['ppl']:.4f}"]
            + [f"{100 * r['ppl_vs_base']:+.2f}%"]
        )
    text = (
        f"# Weight precisions ({args.model}, CPU, {args.threads} thread{'s' if args.threads > 1 else ''}; "
        f"base = {base})\n\n" + report.markdown_table(cols, rows)
    )
    cols = ["Config"] + [f"{p} @{c}" for p in policies for c in contexts]
    tpot = [[r["config"]] + [r["timing"][p][str(c)]["tpot_ms"] for p in policies for c in contexts] for r in results]
    ratio = [
        [r["config"]] + [r["timing"][p][str(c)]["tpot_ratio"] for p in policies for c in contexts] for r in results
    ]
    ttft = [[r["config"]] + [r["timing"][p][str(c)]["ttft_s"] for p in policies for c in contexts] for r in results]
    text += "\n## Decode TPOT (ms), by cache @ context\n\n" + report.markdown_table(cols, tpot)
    text += f"\n## TPOT / {base}\n\n" + report.markdown_table(cols, ratio)
    text += "\n## TTFT (s): prefill of the prompt\n\n" + report.markdown_table(cols, ttft)
    return text + (
        f"\nPPL: {args.text}, first {tokens} tokens, full cache, {args.step} tokens per forward after the "
        f"eviction-free prefix. Timing: a {args.text} prompt of each context length, then {new} greedy tokens, "
        f"{reps} reps, every (config, cache) in this one process taking turns token by token; medians. MB read per "
        "token: every parameter and buffer but the input embedding table (one row of it is read), the tied output "
        "projection counted at its own precision.\n"
    )


if __name__ == "__main__":
    main()
