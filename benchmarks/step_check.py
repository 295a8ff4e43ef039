"""Check the shortcut the long runs take: ``--step 16`` (16 teacher-forced tokens per forward) against the
StreamingLLM protocol (one token per forward from the first token on), same configs, same text.

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.step_check --tokens 640      # ~6 min on a busy 2-core CPU
"""

from __future__ import annotations

import math
import time

from benchmarks import report
from benchmarks.data import expand_texts
from benchmarks.ppl import make_specs, parse_config
from benchmarks.workers import Pool

MODES = {
    "one token per forward": {"step": 1, "chunk_prefix": False},
    "chunked prefix, then one token": {"step": 1},
    "chunked prefix, then 16 tokens": {"step": 16},
}


def main(argv=None) -> None:
    parser = report.common_args(__doc__.splitlines()[0])
    parser.add_argument("--configs", default="h2o_4_64_256,streaming_4_256")
    parser.add_argument("--texts", default="wikitext,moby")
    parser.add_argument("--tokens", type=int, default=640)
    args = parser.parse_args(argv)
    if args.smoke:
        args.configs, args.tokens = "h2o_4_16_64,streaming_4_64", 200
    report.apply_smoke(args)
    start = report.run_start()
    rows = expand_texts(args.texts)
    specs = make_specs(args, [parse_config(c) for c in args.configs.split(",")])
    results = []
    with Pool(specs, inline=args.inline) as pool:
        for i, spec in enumerate(specs):
            nll = {}
            for mode, kwargs in MODES.items():
                t0 = time.perf_counter()
                pool.call(i, "start_stream", rows=rows, n_tokens=args.tokens, **kwargs)
                pool.call(i, "advance", n_tokens=args.tokens)
                nll[mode] = pool.call(i, "stream_result")["nll"]
                reference = nll[next(iter(MODES))]
                results.append(
                    {
                        "config": spec.label,
                        "mode": mode,
                        "seconds": time.perf_counter() - t0,
                        "ppl": {r: math.exp(sum(v) / len(v)) for r, v in zip(rows, nll[mode])},
                        "max_abs_nll_diff": max(abs(a - b) for x, y in zip(nll[mode], reference) for a, b in zip(x, y)),
                    }
                )
    cols = ["Config", "Protocol"] + [f"{r} PPL" for r in rows] + ["max abs ΔNLL per token", "time (s)"]
    table = report.markdown_table(
        cols,
        [
            [r["config"], r["mode"]]
            + [f"{r['ppl'][x]:.4f}" for x in rows]
            + [f"{r['max_abs_nll_diff']:.1e}", r["seconds"]]
            for r in results
        ],
    )
    text = f"# Teacher-forcing protocols compared ({args.model}, {args.tokens} tokens per row)\n\n" + table
    out = report.out_dir(args)
    (out / "step_check.md").write_text(text)
    report.write_json(out / "step_check.json", {"meta": report.meta(args, start), "results": results})
    print(text)


if __name__ == "__main__":
    main()
