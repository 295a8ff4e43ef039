"""What a fixed-shape decode step would buy here: transformers' StaticCache decoded eagerly and through torch.compile,
beside our caches (eager), per weight precision and context, on the CPU or a GPU (``--device``).

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.compile_probe                 # int4 and fp32 at 1k and 4k, ~9 min
    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.compile_probe --smoke --out /tmp/bench

Issue 17 asks for a decode path with fixed shapes (static in-place KV buffers with a validity mask, as gpt-fast
has) so that ``torch.compile`` and, on a GPU, CUDA graphs apply. Before such a path is built into ``H2OLayer``,
this measures its ceiling on the machine at hand: the same model with transformers' ``StaticCache`` (whose shapes are
already fixed) decoded eagerly and as one compiled graph (``fullgraph=True``, ``dynamic=False``: a graph break or a
recompile per step fails the run), against the full cache and an H2O policy of ours, eager as the server runs them.

Per weight precision (``--dtypes``, `load_model` names) and context (``--contexts``), every config prefills the same
prompt, then the configs decode ``--new`` greedy tokens taking turns token by token; TPOT is the median step after
``WARMUP`` steps. The compiled config's first two steps (tracing, code generation) are timed apart as its compile
time. "Agrees for" counts each config's greedy tokens equal to the static cache's eager ones before the first that
differs (compiled code and other caches may reorder float sums, so an argmax can flip on a near tie, and every token
after a flip continues another text). The static configs use a model of their own: ours
switch their model's attention to the H2O hook.
"""

from __future__ import annotations

import statistics
import time

import torch
from transformers import StaticCache

from benchmarks import report, runner
from benchmarks.data import tokenize
from h2o_cache import make_cache
from h2o_cache.loading import resolve_device

WARMUP = 4


class StaticDecoder:
    """transformers' StaticCache, one step a call: eager, or the step compiled into one graph."""

    def __init__(self, model, ids: torch.Tensor, new: int, compiled: bool, backend: str):
        self.model, self.label = model, "StaticCache, torch.compile" if compiled else "StaticCache, eager"
        self.cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + new + WARMUP + 2)
        self.position = ids.shape[1]
        with torch.inference_mode():
            positions = torch.arange(self.position, device=ids.device)
            out = model(input_ids=ids, past_key_values=self.cache, cache_position=positions)
        self.token = out.logits[:, -1:].argmax(-1)
        self.forward = self._forward
        if compiled:
            self.forward = torch.compile(self._forward, backend=backend, fullgraph=True, dynamic=False)

    def _forward(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=token, past_key_values=self.cache, cache_position=position, use_cache=True)
        return out.logits[:, -1:].argmax(-1)

    @torch.inference_mode()
    def step(self) -> int:
        self.token = self.forward(self.token, torch.tensor([self.position], device=self.token.device))
        self.position += 1
        return int(self.token)


class OurDecoder:
    """An H2OCache of ``policy``, eager, as the library and the server decode."""

    def __init__(self, model, ids: torch.Tensor, policy: str):
        self.model, self.label = model, f"ours `{policy}`, eager"
        self.cache = make_cache(model, policy)
        with torch.inference_mode():
            out = model(input_ids=ids, past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        self.token = out.logits[:, -1:].argmax(-1)

    @torch.inference_mode()
    def step(self) -> int:
        out = self.model(input_ids=self.token, past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        self.token = out.logits[:, -1:].argmax(-1)
        return int(self.token)


def measure(args, dtype: str, context: int, policies: list[str]) -> list[dict]:
    static_model, tokenizer = runner.load_precision(args, dtype)
    ours_model, _ = runner.load_precision(args, dtype)
    ids = tokenize(tokenizer, args.text, context, args.data_dir, synthetic=args.smoke)
    ids = torch.tensor([ids], device=static_model.device)
    decoders = [StaticDecoder(static_model, ids, args.new, compiled=False, backend=args.backend)]
    compiled = StaticDecoder(static_model, ids, args.new, compiled=True, backend=args.backend)
    t0 = time.perf_counter()
    first = [compiled.step(), compiled.step()]  # tracing and code generation, timed apart
    compile_s = time.perf_counter() - t0
    decoders += [compiled] + [OurDecoder(ours_model, ids, p) for p in policies]
    tokens = {d.label: [] for d in decoders}
    gaps = {d.label: [] for d in decoders}
    for i in range(args.new + WARMUP):
        for d in decoders:
            t = time.perf_counter()
            tokens[d.label].append(d.step())
            if i >= WARMUP:
                gaps[d.label].append(time.perf_counter() - t)
    reference = tokens[decoders[0].label]
    tokens[compiled.label] = first + tokens[compiled.label][:-2]  # its sequence aligned with the others'
    base = statistics.median(gaps[decoders[0].label])
    return [
        {
            "dtype": dtype,
            "context": context,
            "config": d.label,
            "tpot_ms": 1e3 * statistics.median(gaps[d.label]),
            "vs_static_eager": statistics.median(gaps[d.label]) / base,
            "agrees_for": next(
                (i for i, (a, b) in enumerate(zip(tokens[d.label], reference)) if a != b), len(reference)
            ),
            "tokens": len(reference),
            "compile_s": compile_s if d is compiled else None,
        }
        for d in decoders
    ]


def main(argv=None) -> None:
    parser = report.common_args(__doc__.splitlines()[0])
    parser.add_argument("--dtypes", default="int4,fp32", help="load_model weight precisions (on CUDA: fp16, bf16)")
    parser.add_argument("--contexts", default="1024,4096", help="prompt tokens before decoding")
    parser.add_argument("--policies", default="full,h2o_4_280_560_k8v4", help="our caches beside the static one")
    parser.add_argument("--new", type=int, default=32, help="decode steps timed per config")
    parser.add_argument("--text", default="wikitext")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend")
    args = parser.parse_args(argv)
    recorded = dict(vars(args))
    contexts = [int(c) for c in args.contexts.split(",")]
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    if args.smoke:
        contexts, args.new = [48], 4
        if args.policies == parser.get_default("policies"):
            policies = ["full", "h2o_4_8_32_k8v4"]
    report.apply_smoke(args)
    args.device = "cpu" if args.smoke else resolve_device(args.device)
    start = report.run_start()
    torch.set_num_threads(args.threads)
    results = [r for dtype in args.dtypes.split(",") for c in contexts for r in measure(args, dtype, c, policies)]
    out = report.out_dir(args)
    text = render(results, args)
    (out / "compile_probe.md").write_text(text)
    report.write_json(
        out / "compile_probe.json", {"meta": report.meta(args, start), "args": recorded, "results": results}
    )
    print(text)


def render(results: list[dict], args) -> str:
    rows = [
        [
            r["dtype"],
            r["context"],
            r["config"],
            report.fmt(r["tpot_ms"]),
            report.fmt(r["vs_static_eager"]),
            f"{r['agrees_for']} of {r['tokens']}",
            "-" if r["compile_s"] is None else report.fmt(r["compile_s"], 1),
        ]
        for r in results
    ]
    columns = ["Weights", "Context", "Config", "TPOT (ms)", "/ StaticCache eager", "Agrees for (tokens)", "Compile (s)"]
    return (
        f"# A fixed-shape decode step, eager and compiled ({args.model}, {args.device}, {args.threads} thread"
        f"{'s' if args.threads > 1 else ''}, torch.compile backend `{args.backend}`)\n\n"
        + report.markdown_table(columns, rows)
        + f"\nTPOT: median of {args.new} steps after {WARMUP}, the configs taking turns token by token. Agrees for: "
        "greedy tokens equal to the StaticCache eager ones before the first that differs (warm-up steps included).\n"
    )


if __name__ == "__main__":
    main()
