"""Smoke runs of every benchmark script on the in-process tiny model: output files exist and tables have the
expected shape. The full runs are by hand (benchmarks/README.md)."""

import json

import pytest
import torch

from benchmarks import ablate, batching, compile_probe, eviction, oracle, ppl, recall, speed, step_check, stress
from benchmarks import bytes as bytes_bench
from benchmarks.runner import ReferenceLogprobs, Session, Spec, next_token_divergence, tiny_model
from h2o_cache import CachePolicy
from h2o_cache.budget import session_nbytes


def table_shape(markdown: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the first Markdown table in a file."""
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = []
    for line in lines[2:]:
        if line.startswith("|---"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) != len(header):
            break
        rows.append(cells)
    return header, rows


def test_ppl_smoke(tmp_path):
    ppl.main(["--smoke", "--out", str(tmp_path)])
    for name in ("ppl.md", "ppl.json", "ppl.png"):
        assert (tmp_path / name).stat().st_size > 0
    header, rows = table_shape((tmp_path / "ppl.md").read_text())
    assert header == ppl.columns_for(["wikitext", "pg19", "heldout"], cuda=torch.cuda.is_available())
    assert [r[0] for r in rows] == ppl.SMOKE_CONFIGS.split(",")
    payload = json.loads((tmp_path / "ppl.json").read_text())
    for result in payload["results"]:
        assert set(result["group_ppl"]) == {"wikitext", "pg19", "heldout"}
        assert result["tpot_ms"] > 0 and result["kv_bytes"] > 0


def test_oracle_smoke(tmp_path):
    oracle.main(["--smoke", "--out", str(tmp_path)])
    for name in ("oracle.md", "oracle.json", "oracle.png"):
        assert (tmp_path / name).stat().st_size > 0
    header, rows = table_shape((tmp_path / "oracle.md").read_text())
    assert header == oracle.columns_for(["wikitext", "pg19", "heldout"])
    assert [r[:2] for r in rows] == [
        ["baseline", "-"],
        ["streaming_4_64", "-"],
        ["h2o_4_16_64", oracle.PAST],
        ["h2o_4_16_64", "future attention (oracle)"],
        ["h2o_4_16_64", "future attention, next 32 (oracle)"],
    ]
    results = json.loads((tmp_path / "oracle.json").read_text())["results"]
    h2o = [r for r in results if r["policy"] == "h2o_4_16_64"]
    assert all(r["evicted_tokens"] > 0 and r["kept_tokens_max"] <= 64 + 64 for r in h2o)
    assert len({r["group_ppl"]["wikitext"] for r in h2o}) == 3  # the rankings really differ


def test_recall_smoke(tmp_path):
    configs = recall.SMOKE_CONFIGS.split(",") + ["h2o_4_16_64:score_mode=sum"]
    recall.main(["--smoke", "--out", str(tmp_path), "--configs", ",".join(configs)])
    for name in ("recall.md", "recall.json", "recall.png"):
        assert (tmp_path / name).stat().st_size > 0
    header, rows = table_shape((tmp_path / "recall.md").read_text())
    assert header == recall.COLUMNS
    labels = recall.SMOKE_CONFIGS.split(",") + ["h2o_4_16_64[score_mode=sum]"]
    distances = recall.SMOKE_DISTANCES.split(",")
    assert [(r[0], r[1].rstrip("*")) for r in rows] == [(c, d) for c in labels for d in distances]
    assert all(r[3].endswith(f"/{len(recall.FACTS)}") for r in rows)
    results = json.loads((tmp_path / "recall.json").read_text())["results"]
    kv = {(r["config"], r["distance"]): r["kv_bytes"] for r in results}
    near, far = (int(d) for d in distances)
    for label in labels[1:]:
        assert kv[label, near] == kv[label, far] < kv["full", far]  # bounded: constant, below the full cache
    assert [r["past_trained"] for r in results if r["distance"] == far] == [True, False, False, False]
    assert all(len(r["facts"]) == len(recall.FACTS) and all(f["logprob"] < 0 for f in r["facts"]) for r in results)


def test_recall_questions_match_a_plain_forward():
    """Through the full cache (fed in chunks), a question's answer log-probs and greedy tokens are those of plain
    forwards of the whole text, and asking leaves the conversation as it was."""
    session = Session(Spec(policy="full", model="tiny", options={"chunk_size": 64}))
    ids = session.tokens("moby", 275)
    session.start_chat()
    session.extend_chat(ids=ids[:200])
    session.extend_chat(ids=ids[200:250])
    first = session.probe(prompt_ids=ids[250:270], answer_ids=ids[270:], max_new=4)
    again = session.probe(prompt_ids=ids[250:270], answer_ids=ids[270:], max_new=4)
    assert {k: v for k, v in first.items() if k != "time_s"} == {k: v for k, v in again.items() if k != "time_s"}
    model = tiny_model()[0]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, 269:274]
        expected = logits.log_softmax(-1).gather(-1, torch.tensor(ids[270:])[:, None]).squeeze(-1)
        greedy = ids[:270]
        for _ in range(4):
            greedy.append(int(model(input_ids=torch.tensor([greedy])).logits[0, -1].argmax()))
    torch.testing.assert_close(torch.tensor(first["token_logprobs"]), expected, atol=1e-4, rtol=1e-4)
    assert first["generated"] == session.tokenizer.decode(greedy[270:])
    assert first["max_position"] == 274


def test_bytes_smoke(tmp_path):
    bytes_bench.main(["--smoke", "--out", str(tmp_path)])
    for name in ("bytes.md", "bytes.json", "bytes.png"):
        assert (tmp_path / name).stat().st_size > 0
    payload = json.loads((tmp_path / "bytes.json").read_text())
    groups = ["wikitext", "pg19", "heldout"]
    text = (tmp_path / "bytes.md").read_text()
    assert text.count("## Budget") == 2
    assert table_shape(text)[0] == bytes_bench.columns_for(groups)
    config, dtype = tiny_model()[0].config, torch.float32
    results = payload["results"]
    for n_tokens in map(int, bytes_bench.SMOKE_BUDGETS.split(",")):
        budget = bytes_bench.budget_bytes(config, dtype, n_tokens)
        assert payload["budgets_bytes"][str(n_tokens)] == budget
        mine = [r for r in results if r["budget_tokens"] == n_tokens]
        assert len(mine) == len(bytes_bench.FAMILIES) * 4  # every family x kv_dtype fits the smoke budgets
        for r in mine:
            assert r["session_bytes"] <= budget and r["kv_bytes"] <= budget  # formula and measured cache
            bigger = bytes_bench.policy_name(r["family"], r["capacity"] + bytes_bench.STEP, r["kv_dtype"])
            assert session_nbytes(config, bytes_bench.parse_policy(bigger), dtype) > budget
        assert any(r["evicted_tokens"] > 0 for r in mine)
        best = min(mine, key=lambda r: (r["group_above_pct"]["wikitext"] + r["group_above_pct"]["pg19"]) / 2)
        assert payload["best"][str(n_tokens)] == best["config"]  # chosen on the tuning texts only
    full = next(r for r in results if r["config"] == "full")
    assert full["kl_mean"] < 1e-5 and full["top1_mean"] == 100.0 and full["tpot_ratio"] == 1.0
    for check in payload["reference_checks"]:  # the later pools' full caches, read against the written reference
        assert check["kl_mean"] < 1e-5 and check["top1_mean"] == 100.0
        assert check["ppl_ratio"] == pytest.approx(dict.fromkeys(groups, 1.0), abs=1e-6)
    bounded = [r for r in results if r["budget_tokens"] is not None]
    assert all(r["kl_mean"] > full["kl_mean"] for r in bounded if r["evicted_tokens"] > 0)
    assert [r["config"] for r in results if r["budget_tokens"] is None] == bytes_bench.DEFAULT_REFERENCES.split(",")


def test_next_token_divergence_is_torch_kl_and_argmax(tmp_path):
    """KL(reference || model) and top-1 agreement as the reference file stores and returns them equal a plain torch
    computation on the fp32 log-probs (up to the fp16 storage); a reader ahead of the writer fails."""
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (2, 7))
    ref_logits, logits = torch.randn(2, 6, 50) * 3, torch.randn(2, 6, 50) * 3
    logits[0, :3] = ref_logits[0, :3]
    writer = ReferenceLogprobs(tmp_path, ids, 50, write=True)
    writer.store(0, ref_logits[:, :4])
    reader = ReferenceLogprobs(tmp_path, ids, 50, write=False)
    with pytest.raises(RuntimeError):
        reader.load(2, 3)
    writer.store(4, ref_logits[:, 4:])
    kl, agree = next_token_divergence(logits, *reader.load(0, 6))
    ref = ref_logits.log_softmax(-1)
    expected = torch.nn.functional.kl_div(logits.log_softmax(-1), ref, log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(kl, expected, atol=1e-4, rtol=1e-3)
    assert (kl[0, :3] < 1e-5).all() and kl[1].min() > 1e-2
    assert agree.tolist() == (logits.argmax(-1) == ref_logits.argmax(-1)).tolist() and agree[0, :3].all()
    with pytest.raises(ValueError):
        ReferenceLogprobs(tmp_path, ids + 1, 50, write=False)


def test_ablate_smoke(tmp_path):
    ablate.main(["--smoke", "--out", str(tmp_path)])
    text = (tmp_path / "ablations.md").read_text()
    assert text.count("## Phase") == 3
    payload = json.loads((tmp_path / "ablations.json").read_text())
    assert "tale" not in payload["rows"] + payload["slack_rows"]
    assert len(payload["phase1"]) == len(ablate.phase1_grid(smoke=True))


def test_ablate_refuses_heldout(tmp_path):
    with pytest.raises(SystemExit):
        ablate.main(["--smoke", "--out", str(tmp_path), "--texts", "wikitext,heldout"])


def test_speed_smoke(tmp_path):
    speed.main(["--smoke", "--out", str(tmp_path)])
    header, rows = table_shape((tmp_path / "speed.md").read_text())
    assert header[:4] == ["Context", "Config", "TTFT (s)", "TPOT (ms)"]
    assert len(rows) == 4 * 2  # 3 contexts + the one h2o_4_16_64 holds (64 + 64 / 2 = 96), x 2 configs
    payload = json.loads((tmp_path / "speed.json").read_text())
    overhead = payload["overhead"]
    assert [(r["config"], r["context"], r["held_tokens"]) for r in overhead] == [
        ("h2o_4_16_64", 128, 96),
        ("h2o_4_16_64", 256, 96),
    ]
    baseline_96 = next(r for r in payload["results"] if r["config"] == "baseline" and r["context"] == 96)
    assert all(r["base_same_size_ms"] == baseline_96["tpot_mean_ms"] for r in overhead)
    assert (tmp_path / "speed_tpot.png").stat().st_size > 0


def test_stress_smoke(tmp_path):
    stress.main(["--smoke", "--out", str(tmp_path)])
    payload = json.loads((tmp_path / "stress.json").read_text())
    windows = payload["windows"]
    assert len(windows["baseline"]) == 768 // 128 and len(windows["h2o_4_16_64"]) == 1024 // 128
    bounded = [w["kv_bytes"] for w in windows["h2o_4_16_64"]]
    assert max(bounded) == min(bounded)  # bounded cache: constant allocation
    for name in ("ppl", "tpot", "kv", "rss"):
        assert (tmp_path / f"stress_{name}.png").stat().st_size > 0


def test_batching_smoke(tmp_path):
    batching.main(["--smoke", "--out", str(tmp_path)])
    payload = json.loads((tmp_path / "batching.json").read_text())
    assert [(r["sessions"], r["tokens"]) for r in payload["runs"]] == [(1, 8), (4, 32)]
    assert [d["dtype"] for d in payload["dtypes"]] == ["fp32", "int8"]
    assert [m["turn"] for m in payload["memory"]] == [0, 1, 2]
    assert payload["meta"]["git_commit"]
    assert (tmp_path / "batching.md").read_text().count("## ") == 3


def test_step_check_smoke(tmp_path):
    step_check.main(["--smoke", "--out", str(tmp_path)])
    header, rows = table_shape((tmp_path / "step_check.md").read_text())
    assert header[:2] == ["Config", "Protocol"] and len(rows) == 6
    assert all(float(r[4]) < 1e-3 for r in rows)  # every protocol gives the one-token NLLs


def test_eviction_smoke(tmp_path):
    eviction.main(["--smoke", "--out", str(tmp_path)])
    header, rows = table_shape((tmp_path / "eviction.md").read_text())
    assert header == ["Rows", "Variant", "Per layer-step (us)", "Per model step (ms)"]
    one_row = ["overwrite (no rolling)", "gather, slack 0", "gather, slack 16", "gather, slack 64"]
    four_rows = [
        "overwrite (no rolling)",
        "gather, slack 0",
        "gather, slack 16",
        "gather, slack 16, rows out of phase",
        "gather, slack 64",
        "gather, slack 64, rows out of phase",
    ]
    assert [(r[0], r[1]) for r in rows] == [("1", v) for v in one_row] + [("4", v) for v in four_rows]
    assert all(float(r[3]) > 0 for r in rows)


def test_the_overwrite_variant_keeps_what_the_policy_keeps():
    policy = CachePolicy.parse("h2o_4_8_32")
    layer = eviction.OverwriteLayer(policy, rows=2, kv_heads=2, head_dim=8)
    for _ in range(100):
        layer.step(torch.randn(2, 4, 1, 8), torch.randn(2, 2, 1, 8), torch.randn(2, 2, 1, 8))
    positions = layer.position.sort(-1).values
    assert positions.shape[-1] == 32 and (positions[..., 1:] > positions[..., :-1]).all()  # capacity, no slot twice
    assert (positions[..., :4] == torch.arange(4)).all()  # sinks
    assert (positions[..., -8:] == torch.arange(92, 100)).all()  # recent window


@pytest.mark.parametrize("policy", ["baseline", "streaming_4_64", "h2o_4_16_64"])
def test_chunked_prefix_matches_one_token_per_forward(policy):
    """The eviction-free prefix is fed in chunks; that must not change a single NLL."""
    session = Session(Spec(policy=policy, model="tiny"))
    nll = {}
    for chunk_prefix in (False, True):
        session.start_stream(["wikitext", "moby"], 200, step=1, chunk_prefix=chunk_prefix)
        session.advance(200)
        nll[chunk_prefix] = torch.tensor(session.stream_result()["nll"])
    torch.testing.assert_close(nll[True], nll[False], atol=1e-4, rtol=1e-4)


def test_oracle_attention_totals_are_the_full_cache_attention_received_so_far():
    """What the oracle ranks by: eager attention of the full model, summed over each KV group's query heads and
    over the queries before each step boundary."""
    session = Session(Spec(policy="full", model="tiny"))
    rows, n, step = ["wikitext", "moby"], 48, 16
    totals = oracle.attention_totals(session, rows, n, step)
    model = tiny_model()[0]
    model.set_attn_implementation("eager")
    ids = torch.tensor([session.tokens(r, n) for r in rows])
    with torch.no_grad():
        attentions = model(input_ids=ids, output_attentions=True).attentions  # per layer (rows, heads, q, k)
    kv_heads = model.config.num_key_value_heads
    assert totals.shape == (n // step + 1, len(rows), len(attentions), kv_heads, n)
    for layer, probs in enumerate(attentions):
        grouped = probs.view(len(rows), kv_heads, -1, n, n).sum(2)  # (rows, kv_heads, q, k)
        for b in range(n // step + 1):
            torch.testing.assert_close(totals[b, :, layer], grouped[:, :, : b * step].sum(2), atol=1e-5, rtol=1e-5)


def test_compile_probe_smoke(tmp_path):
    """The compiled step is one graph (fullgraph) that decodes the eager static cache's tokens, as our full cache does;
    aot_eager traces as inductor does without compiling C++ (seconds, not half a minute)."""
    compile_probe.main(["--smoke", "--dtypes", "fp32", "--backend", "aot_eager", "--out", str(tmp_path)])
    header, rows = table_shape((tmp_path / "compile_probe.md").read_text())
    assert header[:3] == ["Weights", "Context", "Config"]
    assert [r[2] for r in rows] == [
        "StaticCache, eager",
        "StaticCache, torch.compile",
        "ours `full`, eager",
        "ours `h2o_4_8_32_k8v4`, eager",
    ]
    results = {r["config"]: r for r in json.loads((tmp_path / "compile_probe.json").read_text())["results"]}
    assert results["StaticCache, torch.compile"]["agrees_for"] == results["StaticCache, torch.compile"]["tokens"] == 8
    assert results["StaticCache, torch.compile"]["compile_s"] > 0
    assert results["ours `full`, eager"]["agrees_for"] == 8
