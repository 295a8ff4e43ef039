"""Eviction in a slot pool: the paper's in-place overwrite against this library's compacting gather, per decode step.

    .venv/bin/python -m benchmarks.eviction                    # SmolLM2's attention shapes, 1 and 16 rows
    .venv/bin/python -m benchmarks.eviction --smoke --out /tmp/bench

Both keep ``capacity`` tokens per row and KV head (sinks + recent window + heavy hitters by mean attention) and run
the same decode attention with score accumulation, on one attention layer of the model's shapes with random
keys; the time per step is multiplied by the number of layers.

* **overwrite** (H2O paper): once full, every step evicts the lowest-scoring unprotected slot and writes the new
  token into it (argmin + scatter). Slots stop being in position order, so keys keep their original rotation: no
  position rolling (rolling would re-rotate every key every step).
* **gather** (``H2OLayer``): the row grows to ``capacity + slack`` slots and is then cut back to ``capacity`` in one
  top-k + gather, re-rotating the kept keys to rolled positions; ``slack 0`` gathers every step.
"""

from __future__ import annotations

import statistics
import time
from functools import partial

import torch
from transformers import AutoConfig

from benchmarks import report
from benchmarks.runner import SMOKE_MODEL, tiny_model
from h2o_cache import CachePolicy
from h2o_cache.cache import H2OLayer
from h2o_cache.loading import resolve_model_path
from h2o_cache.rope import RotaryDelta


class OverwriteLayer:
    """The paper's slot reuse: a full cache replaces its least-scored unprotected slot by the new token."""

    def __init__(self, policy: CachePolicy, rows: int, kv_heads: int, head_dim: int) -> None:
        self.policy = policy
        n = policy.capacity
        self.keys = torch.zeros(rows, kv_heads, n, head_dim)
        self.values = torch.zeros(rows, kv_heads, n, head_dim)
        self.scores = torch.zeros(rows, kv_heads, n)
        self.position = torch.zeros(rows, kv_heads, n, dtype=torch.int64)
        self.length = 0
        self.seen = 0

    def step(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Append one token per row (overwriting a victim once full), then attend and accumulate scores."""
        p = self.policy
        if self.length < p.capacity:
            slot = torch.full(self.scores.shape[:2] + (1,), self.length)
            self.length += 1
        else:
            observers = (self.seen - self.position).clamp(min=1).float()
            protected = (self.position < p.n_sink) | (self.position >= self.seen - p.n_recent + 1)
            slot = (self.scores / observers).masked_fill(protected, float("inf")).argmin(-1, keepdim=True)
        self.keys.scatter_(2, slot[..., None].expand_as(key), key)
        self.values.scatter_(2, slot[..., None].expand_as(value), value)
        self.scores.scatter_(2, slot, 0.0)
        self.position.scatter_(2, slot, self.seen)
        self.seen += 1
        keys, values = self.keys[:, :, : self.length], self.values[:, :, : self.length]
        b, hq, _, d = query.shape
        hk = keys.shape[1]
        logits = torch.matmul(query.view(b, hk, hq // hk, d) / d**0.5, keys.transpose(-1, -2))
        probs = logits.softmax(-1)
        self.scores[:, :, : self.length] += probs.sum(2)
        return torch.matmul(probs, values).view(b, hq, 1, d)


def gather_step(
    layer: H2OLayer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, new_valid: torch.Tensor | None = None
) -> torch.Tensor:
    counts = [] if new_valid is None else new_valid.sum(-1).tolist()
    layer.begin_forward(new_valid, counts, 1)
    layer.update(key, value)
    return layer.attend(query, None)


def time_steps(
    step, rows: int, heads: int, kv_heads: int, head_dim: int, fill: int, steps: int, stagger: int = 0
) -> list[float]:
    """Seconds per decode step after `fill` warm-up steps (the cache is full and evicting by then). With
    `stagger`, row r sits out (padding) `r * stagger` warm-up steps, so the rows reach their budget at different
    steps, as the sessions of a server's pool do."""
    gen = torch.Generator().manual_seed(0)

    def one(new_valid: torch.Tensor | None = None) -> float:
        q = torch.randn(rows, heads, 1, head_dim, generator=gen)
        k, v = (torch.randn(rows, kv_heads, 1, head_dim, generator=gen) for _ in range(2))
        t = time.perf_counter()
        step(q, k, v) if new_valid is None else step(q, k, v, new_valid)
        return time.perf_counter() - t

    for i in range(fill):
        one(torch.tensor([[i >= r * stagger] for r in range(rows)]) if stagger else None)
    return [one() for _ in range(steps)]


def model_shapes(model: str) -> tuple[int, int, int, int, RotaryDelta]:
    """(layers, query heads, KV heads, head dim, rotary) of `model`, from its config alone (no weights)."""
    from transformers import AutoModelForCausalLM

    if model == SMOKE_MODEL:
        config = tiny_model()[0].config
    else:
        config = AutoConfig.from_pretrained(resolve_model_path(model))
    layers = config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    config.num_hidden_layers, config.vocab_size = 1, 16  # a one-layer shell for the rotary frequencies
    shell = AutoModelForCausalLM.from_config(config)
    return layers, config.num_attention_heads, config.num_key_value_heads, head_dim, RotaryDelta.from_model(shell)


def main(argv=None) -> None:
    parser = report.common_args(__doc__.splitlines()[0])
    parser.add_argument("--policy", default="h2o_4_256_512")
    parser.add_argument("--rows", default="1,16", help="batch rows (pool sizes) to time")
    parser.add_argument("--slacks", default="0,16,64", help="slack values of the gather variant")
    parser.add_argument("--steps", type=int, default=256, help="timed decode steps per variant")
    args = parser.parse_args(argv)
    if args.smoke:
        args.model, args.policy, args.rows, args.steps = SMOKE_MODEL, "h2o_4_12_32", "1,4", 32
    torch.set_num_threads(args.threads)
    start = report.run_start()
    layers, heads, kv_heads, head_dim, rotary = model_shapes(args.model)
    base = CachePolicy.parse(args.policy)
    results = []
    for rows in map(int, args.rows.split(",")):
        variants = {"overwrite (no rolling)": (OverwriteLayer(base, rows, kv_heads, head_dim).step, 0)}
        for slack in map(int, args.slacks.split(",")):
            staggers = [0] + ([slack // rows] if rows > 1 and slack >= rows else [])
            for stagger in staggers:
                layer = H2OLayer(CachePolicy.parse(args.policy, slack=slack), rotary)
                name = f"gather, slack {slack}" + (", rows out of phase" if stagger else "")
                variants[name] = (partial(gather_step, layer), stagger)
        times = {name: [] for name in variants}
        for step, stagger in variants.values():  # warm every variant up to a full, evicting cache
            fill = base.capacity + 2 * base.slack + rows * stagger
            time_steps(step, rows, heads, kv_heads, head_dim, fill, 0, stagger)
        for _ in range(4):  # interleaved rounds, so machine noise hits all alike
            for name, (step, _) in variants.items():
                times[name] += time_steps(step, rows, heads, kv_heads, head_dim, 0, args.steps // 4)
        for name, t in times.items():
            results.append(
                {
                    "rows": rows,
                    "variant": name,
                    "layer_step_us": 1e6 * statistics.mean(t),
                    "model_step_ms": 1e3 * layers * statistics.mean(t),
                }
            )
    out = report.out_dir(args)
    payload = {"args": vars(args), "layers": layers, "results": results, "meta": report.meta(args, start)}
    report.write_json(out / "eviction.json", payload)
    text = (
        f"# Eviction: in-place overwrite vs compacting gather ({args.model} shapes: {layers} layers, {heads} "
        f"query / {kv_heads} KV heads, head dim {head_dim}; policy {base.name}; mean over {args.steps} decode "
        f"steps of a full cache, append + eviction + attention with scores)\n\n"
    )
    text += report.markdown_table(
        ["Rows", "Variant", "Per layer-step (us)", "Per model step (ms)"],
        [[r["rows"], r["variant"], r["layer_step_us"], r["model_step_ms"]] for r in results],
    )
    (out / "eviction.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
