"""Weight precisions side by side: perplexity, decode TPOT, TTFT and weight bytes per `load_model` dtype (issue 17).

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.weights                     # SmolLM2, ~15 min on a busy 2-core CPU
    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.weights --smoke --out /tmp/bench

Every config is a model in this one process (no workers), driven through :class:`benchmarks.runner.Session`:
teacher-forced PPL on the full cache (chunked eviction-free prefix, ``--step`` tokens per forward; the configs take
turns every 64 tokens), then for each context a prefill and greedy decode of ``--new`` tokens, the configs taking
turns token by token, so that the machine's noise hits them alike. Ratios are to the first config at the same
context, from the same run.

A config is a `load_model` dtype (``fp32``, ``bf16``, ``int8``, ``int4``) or a weight-only variant that shows why the
defaults are what they are (:mod:`h2o_cache.weights`): ``int8:act=fp32`` (fp32 model, each Linear casting to bf16
and back), ``int4:head=int4`` (the output projection in int4 too; ``head=dense`` leaves it as loaded),
``int4:group=64``.
"""

from __future__ import annotations

from unittest import mock

import torch

from benchmarks import report, runner
from benchmarks.ppl import parse_config, ppl_pass, timing_pass
from benchmarks.runner import Session, Spec
from h2o_cache.loading import DTYPES, WEIGHT_DTYPES, load_model
from h2o_cache.weights import INT4_GROUP_SIZE, OUTPUT_PRECISION, quantize_weights, weight_nbytes

CONFIGS = "fp32,bf16,int8,int4,int8:act=fp32,int4:act=fp32,int4:head=int4,int4:group=64"
SMOKE_CONFIGS = "fp32,bf16,int8,int4,int4:act=fp32"


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
    act = options.get("act", "bf16" if weight_only else precision)
    head = options.get("head", OUTPUT_PRECISION if weight_only else None)
    group = int(options.get("group", INT4_GROUP_SIZE))
    described = {"weights": precision, "activations": act, "lm_head": head or precision, "group": None}
    if weight_only and precision == "int4":
        described["group"] = group
    if args.smoke:
        model, tokenizer = runner.tiny_model()
        model = model.to(DTYPES[act])
    elif weight_only and options:  # a variant: the load_model path with other choices
        model, tokenizer = load_model(args.model, device=args.device, dtype=act)
    else:  # what H2O_DTYPE=<precision> serves
        model, tokenizer = load_model(args.model, device=args.device, dtype=precision)
        return model, tokenizer, described
    if weight_only:
        model = quantize_weights(model, precision, group_size=group, output=None if head == "dense" else head)
    return model, tokenizer, described


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
    parser.add_argument("--text", default="wikitext", help="text row for PPL and the prompts")
    parser.add_argument("--tokens", type=int, default=1024, help="tokens in the PPL pass")
    parser.add_argument("--step", type=int, default=16, help="tokens per forward after the prefix")
    parser.add_argument("--contexts", default="256,1024", help="prompt lengths for the decode timing")
    parser.add_argument("--new", type=int, default=32, help="greedy tokens per timing run")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args(argv)
    recorded = dict(vars(args))
    configs = SMOKE_CONFIGS if args.smoke and args.configs == CONFIGS else args.configs
    tokens, contexts, new, reps = args.tokens, [int(c) for c in args.contexts.split(",")], args.new, args.reps
    if args.smoke:
        tokens, contexts, new, reps = 128, [32, 64], 4, 1
    report.apply_smoke(args)
    args.device = args.device or "cpu"  # the weight-only kernels are the CPU's
    start = report.run_start()
    torch.set_num_threads(args.threads)
    labels = [c.strip() for c in configs.split(",") if c.strip()]
    sessions, described = [], []
    for label in labels:
        model, tokenizer, what = build(label, args)
        spec = Spec(policy="full", model=args.model, device=args.device, threads=args.threads, data_dir=args.data_dir)
        sessions.append(session(model, tokenizer, spec))
        described.append({"config": label, **what, "weight_bytes": weight_nbytes(model)})
    pool = InProcess(sessions)
    quality = ppl_pass(pool, [args.text], tokens, args.step)
    results = [{**d, "ppl": q["ppl"][args.text], "ppl_time_s": q["ppl_time_s"]} for d, q in zip(described, quality)]
    for ctx in contexts:
        timing = timing_pass(pool, args.text, ctx, new, reps, desc=f"context {ctx}")
        for r, t in zip(results, timing):
            r.setdefault("timing", {})[ctx] = {k: v for k, v in t.items() if k != "gen_kv_bytes"}
    base = results[0]
    for r in results:
        r["ppl_vs_base"] = r["ppl"] / base["ppl"] - 1
        r["bytes_vs_base"] = r["weight_bytes"]["per_token"] / base["weight_bytes"]["per_token"]
        for ctx, t in r["timing"].items():
            t["tpot_ratio"] = t["tpot_ms"] / base["timing"][ctx]["tpot_ms"]
    out = report.out_dir(args)
    text = render(results, labels[0], contexts, args, tokens, new, reps)
    (out / "weights.md").write_text(text)
    report.write_json(
        out / "weights.json",
        {"meta": report.meta(args, start), "args": recorded, "contexts": contexts, "results": results},
    )
    print(text)


def render(results: list[dict], base: str, contexts: list[int], args, tokens: int, new: int, reps: int) -> str:
    cols = ["Config", "Weights", "Activations", "lm_head", "MB read / token", "Resident MB", "PPL", "PPL vs base"]
    cols += [f"TPOT @{c} (ms)" for c in contexts] + [f"TPOT @{c} / base" for c in contexts]
    cols += [f"TTFT @{c} (s)" for c in contexts]
    rows = []
    for r in results:
        weights = r["weights"] + (f" g{r['group']}" if r["group"] else "")
        rows.append(
            [r["config"], weights, r["activations"], r["lm_head"]]
            + [r["weight_bytes"]["per_token"] / 1e6, r["weight_bytes"]["total"] / 1e6, f"{r['ppl']:.4f}"]
            + [f"{100 * r['ppl_vs_base']:+.2f}%"]
            + [r["timing"][c]["tpot_ms"] for c in contexts]
            + [r["timing"][c]["tpot_ratio"] for c in contexts]
            + [r["timing"][c]["ttft_s"] for c in contexts]
        )
    return (
        f"# Weight precisions ({args.model}, CPU, {args.threads} thread{'s' if args.threads > 1 else ''}; "
        f"base = {base})\n\n"
        + report.markdown_table(cols, rows)
        + f"\nPPL: {args.text}, first {tokens} tokens, full cache, {args.step} tokens per forward after the "
        f"eviction-free prefix. Timing: full cache, a {args.text} prompt of each context length, then {new} greedy "
        f"tokens, {reps} reps, every config in this one process taking turns token by token; medians. Weight MB read "
        "per token: every parameter and buffer but the input embedding table (one row of it is read), the tied "
        "output projection counted at its own precision.\n"
    )


if __name__ == "__main__":
    main()
