"""Where one decode step's time goes: torch.profiler over decode steps at ~1k context, per weight precision and cache.

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.profile_step              # fp32 (before) vs int4 (after), ~3 min
    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.profile_step --smoke --out /tmp/bench

For each weight precision (``--dtypes``, `load_model` names) and cache policy (``--policies``) the model prefills
``--context`` tokens, then decodes greedily. First every config's unprofiled steps, taking turns token by token (the
TPOT the profile is read against); then ``--steps`` steps of each config under ``torch.profiler`` with a
``record_function`` range around each piece, which costs the profiled step some time of its own. ``--steps`` is
the policy's slack by default, so an H2O cache's one eviction per slack steps is in the profile at its real rate.

Rows, per decode step:

* ``weights: Linear``: the 7 projections of every layer (q, k, v, o, gate, up, down), dense or weight-only kernels.
* ``weights: lm_head``: the output projection (49k x 576 for SmolLM2).
* ``attention``: the cache's ``attend`` without scoring and eviction: SDPA (full cache) or QK^T, softmax and PV
  (H2O, whose probabilities feed the scores).
* ``H2O scoring``: the scorer adding this step's attention to the slots' scores.
* ``H2O eviction``: choosing the kept slots and gathering them (once per slack steps).
* ``KV append``: the cache's ``update``: writing the new keys and values and the slots' bookkeeping.
* ``rest of the layers``: norms, RoPE, SiLU-gating, residual adds, the module calls themselves.
* ``outside the layers``: embedding, final norm, transformers' and h2o_cache's forward wrappers, argmax.

Each row splits into time inside ATen operators (their self times) and the rest: Python, module dispatch, hooks.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections import defaultdict
from unittest import mock

import torch
from torch.autograd.profiler import record_function
from torch.profiler import ProfilerActivity, profile

from benchmarks import report, runner
from benchmarks.data import tokenize
from h2o_cache import CachePolicy, make_cache
from h2o_cache.cache import H2OLayer
from h2o_cache.weights import QUANTIZED_LINEARS

PREFIX = "h2o_profile::"
ROWS = [
    ("weights: Linear", "linear"),
    ("weights: lm_head", "lm_head"),
    ("attention", "attention"),
    ("H2O scoring", "scoring"),
    ("H2O eviction", "eviction"),
    ("KV append", "kv_append"),
    ("rest of the layers", "layer_rest"),
    ("outside the layers", "outside"),
]


@contextlib.contextmanager
def labelled(model, cache):
    """Profiler ranges around the pieces of a step: hooks on the model's modules, wrappers on the cache's methods
    (on their classes: profile one config at a time)."""
    handles = []
    head = model.get_output_embeddings()

    def ranged(module, name):
        ranges = []

        def pre(*_):
            ranges.append(record_function(PREFIX + name))
            ranges[-1].__enter__()

        def post(*_):
            ranges.pop().__exit__(None, None, None)

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))

    for module in model.modules():
        if module is head:
            ranged(module, "lm_head")
        elif isinstance(module, (torch.nn.Linear, *QUANTIZED_LINEARS)):
            ranged(module, "linear")
    for layer in model.model.layers:
        ranged(layer, "layer")

    def wrap(owner, method, name):
        original = getattr(owner, method)

        def wrapped(*args, **kwargs):
            with record_function(PREFIX + name):
                return original(*args, **kwargs)

        return mock.patch.object(owner, method, wrapped)

    scorer_classes = {type(layer.scorer) for layer in cache.layers}
    patches = [wrap(H2OLayer, "update", "kv_append"), wrap(H2OLayer, "attend", "attend")]
    patches.append(wrap(H2OLayer, "_compact", "eviction"))
    patches += [wrap(cls, method, "scoring") for cls in scorer_classes for method in ("before_forward", "accumulate")]
    with contextlib.ExitStack() as stack:
        for p in patches:
            stack.enter_context(p)
        try:
            yield
        finally:
            for h in handles:
                h.remove()


def breakdown(events, n_steps: int, n_layers: int) -> dict:
    """Per-step ms of each row (inclusive range time, and the part inside ATen operators) from profiler events."""
    inclusive, aten = defaultdict(float), defaultdict(float)

    def aten_below(event) -> float:
        own = event.self_cpu_time_total if event.name.startswith("aten::") else 0.0
        return own + sum(aten_below(child) for child in event.cpu_children)

    for event in events:
        if event.name.startswith(PREFIX):
            name = event.name[len(PREFIX) :]
            inclusive[name] += event.cpu_time_total
            aten[name] += aten_below(event)
    if not inclusive["step"]:
        raise RuntimeError("the profile holds no step")

    def row(total: float, in_aten: float) -> dict:
        return {"ms": total / 1e3 / n_steps, "aten_ms": in_aten / 1e3 / n_steps}

    def minus(a: str, *bs: str) -> tuple[float, float]:
        return inclusive[a] - sum(inclusive[b] for b in bs), aten[a] - sum(aten[b] for b in bs)

    rows = {
        "linear": row(inclusive["linear"], aten["linear"]),
        "lm_head": row(inclusive["lm_head"], aten["lm_head"]),
        "attention": row(*minus("attend", "scoring", "eviction")),
        "scoring": row(inclusive["scoring"], aten["scoring"]),
        "eviction": row(inclusive["eviction"], aten["eviction"]),
        "kv_append": row(inclusive["kv_append"], aten["kv_append"]),
        "layer_rest": row(*minus("layer", "linear", "attend", "kv_append")),
        "outside": row(*minus("step", "layer", "lm_head")),
    }
    step = row(inclusive["step"], aten["step"])
    layer = row(inclusive["layer"], aten["layer"])
    return {
        "rows": rows,
        "step": step,
        "per_layer": {k: v / n_layers for k, v in layer.items()},
        "per_layer_outside_aten_ms": (layer["ms"] - layer["aten_ms"]) / n_layers,
    }


def top_ops(events, n_steps: int, k: int = 12) -> list[dict]:
    """The ATen operators with the most self time per step."""
    totals, counts = defaultdict(float), defaultdict(int)
    for event in events:
        if event.name.startswith("aten::"):
            totals[event.name] += event.self_cpu_time_total
            counts[event.name] += 1
    ranked = sorted(totals, key=totals.get, reverse=True)[:k]
    return [{"op": op, "self_ms": totals[op] / 1e3 / n_steps, "calls": counts[op] / n_steps} for op in ranked]


class Config:
    """One (precision, policy): a model (shared between the policies of a precision), a cache, the next token."""

    def __init__(self, model, ids: list[int], dtype: str, policy: str):
        self.model, self.dtype, self.policy = model, dtype, CachePolicy.parse(policy)
        self.label = f"{dtype} / {policy}"
        self.cache = make_cache(model, self.policy)
        with torch.inference_mode():
            out = model(input_ids=torch.tensor([ids]), past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        self.token = out.logits[:, -1:].argmax(-1)

    @torch.inference_mode()
    def step(self) -> float:
        t0 = time.perf_counter()
        with record_function(PREFIX + "step"):
            out = self.model(input_ids=self.token, past_key_values=self.cache, use_cache=True, logits_to_keep=1)
            self.token = out.logits[:, -1:].argmax(-1)
        return time.perf_counter() - t0


def main(argv=None) -> None:
    parser = report.common_args(__doc__.splitlines()[0])
    parser.add_argument("--dtypes", default="fp32,int4", help="load_model dtypes: before, after")
    parser.add_argument("--policies", default="full,h2o_4_128_512")
    parser.add_argument("--context", type=int, default=1024, help="prompt tokens before the profiled steps")
    parser.add_argument("--text", default="wikitext")
    parser.add_argument("--steps", type=int, default=None, help="profiled steps (default: the largest slack, or 16)")
    parser.add_argument("--timed", type=int, default=48, help="unprofiled steps per config, taking turns")
    args = parser.parse_args(argv)
    recorded = dict(vars(args))
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    context, timed = args.context, args.timed
    if args.smoke:
        context, timed = 96, 4
        if args.policies == parser.get_default("policies"):
            policies = ["full", "h2o_4_8_32"]
    report.apply_smoke(args)
    args.device = args.device or "cpu"
    start = report.run_start()
    torch.set_num_threads(args.threads)
    bounded = [CachePolicy.parse(p) for p in policies if CachePolicy.parse(p).capacity is not None]
    steps = args.steps or (4 if args.smoke else max([p.slack for p in bounded], default=16))
    configs = []
    for dtype in args.dtypes.split(","):
        model, tokenizer = runner.load_precision(args, dtype)
        ids = tokenize(tokenizer, args.text, context, args.data_dir, synthetic=args.smoke)
        configs += [Config(model, ids, dtype, p) for p in policies]
    # unprofiled: the configs take turns token by token (warm-up steps first)
    timings = defaultdict(list)
    for i in range(timed + 4):
        for c in configs:
            dt = c.step()
            if i >= 4:
                timings[c.label].append(dt)
    results = []
    for c in configs:
        n_layers = len(c.model.model.layers)
        with labelled(c.model, c.cache), profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                c.step()
        events = prof.events()
        result = breakdown(events, steps, n_layers)
        results.append(
            {
                "config": c.label,
                "dtype": c.dtype,
                "policy": c.policy.name,
                "context": context,
                "kept_tokens": c.cache.kept_tokens(),
                "evicted_tokens": c.cache.evicted_tokens,
                "n_layers": n_layers,
                "tpot_ms": 1e3 * statistics.median(timings[c.label]),
                "tpot_mean_ms": 1e3 * statistics.mean(timings[c.label]),
                "profiled_steps": steps,
                **result,
                "top_ops": top_ops(events, steps),
            }
        )
    out = report.out_dir(args)
    text = render(results, args, context, timed, steps)
    (out / "profile_step.md").write_text(text)
    payload = {"meta": report.meta(args, start), "args": recorded, "results": results}
    report.write_json(out / "profile_step.json", payload)
    print(text)


def render(results: list[dict], args, context: int, timed: int, steps: int) -> str:
    cols = ["Row"] + [r["config"] for r in results]
    table = []
    for title, key in ROWS:
        cells = []
        for r in results:
            row = r["rows"][key]
            share = 100 * row["ms"] / r["step"]["ms"]
            cells.append(f"{row['ms']:.2f} ({share:.0f}%; ATen {row['aten_ms']:.2f})")
        table.append([title, *cells])
    table.append(["**profiled step**"] + [f"{r['step']['ms']:.2f} (ATen {r['step']['aten_ms']:.2f})" for r in results])
    table.append(["unprofiled TPOT, median"] + [f"{r['tpot_ms']:.2f}" for r in results])
    table.append(["per layer: all"] + [f"{r['per_layer']['ms']:.3f}" for r in results])
    table.append(["per layer: outside ATen ops"] + [f"{r['per_layer_outside_aten_ms']:.3f}" for r in results])
    table.append(["step outside ATen ops"] + [f"{r['step']['ms'] - r['step']['aten_ms']:.2f}" for r in results])
    table.append(["tokens held at the end"] + [str(r["kept_tokens"]) for r in results])
    text = (
        f"# One decode step ({args.model}, CPU, {args.threads} thread{'s' if args.threads > 1 else ''}, "
        f"{context}-token prompt)\n\n"
        f"ms per step (share of the profiled step; of which inside ATen operators). Profiled: {steps} steps per "
        f"config; unprofiled TPOT: {timed} steps per config, configs taking turns.\n\n"
        + report.markdown_table(cols, table)
    )
    for r in results:
        ops = [[o["op"], o["self_ms"], o["calls"]] for o in r["top_ops"]]
        text += f"\n## {r['config']}: ATen operators by self time per step\n\n"
        text += report.markdown_table(["Operator", "self ms / step", "calls / step"], ops)
    return text


if __name__ == "__main__":
    main()
