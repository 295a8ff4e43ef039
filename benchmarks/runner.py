"""The one place that drives a model through a cache: teacher-forced NLL streams, timed generation and chat
conversations that are asked questions (recall).

A :class:`Session` is one (model, cache policy) pair. Scripts create one per config (in its own worker process, see
:mod:`benchmarks.workers`) and advance them in round-robin, so that machine noise hits every config alike.

Teacher forcing follows StreamingLLM: after an eviction-free prefix, tokens go through the compressed cache
``step`` at a time (1 = one token per forward) and the NLL of each next token is recorded. The prefix (the first
``capacity`` tokens; every token for the full cache) cannot trigger an eviction, so it is fed in chunks: same logits
as one token per forward (checked in tests/benchmarks), a fraction of the CPU time.

A stream may also be compared with a reference run of the same tokens (:meth:`Session.set_reference`): one session
(the full cache) writes its next-token log-probs to a folder of memory-mapped files, the others read them at the same
positions and record KL(reference || this cache) and top-1 agreement (see :func:`next_token_divergence`).
"""

from __future__ import annotations

import copy
import os
import resource
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import torch

from benchmarks.data import FILES, resolve_data_dir, tokenize
from h2o_cache import CachePolicy, H2OCache, Scorer, load_model, make_cache
from h2o_cache.loading import resolve_dtype
from h2o_cache.weights import WEIGHT_DTYPES, quantize_weights

PREFIX_CHUNK = 64  # tokens per forward in the eviction-free prefix; bounds the (rows, chunk, vocab) logits
SMOKE_MODEL = "tiny"


class ByteTokenizer:
    """UTF-8 bytes as token ids: the tokenizer of the in-process tiny model (no files, no hub)."""

    vocab_size = 256
    eos_token_id = None  # a random model never stops; generation runs to its token limit

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def apply_chat_template(
        self, messages: list[dict], tokenize: bool = False, add_generation_prompt: bool = False
    ) -> str:
        """A trivial ``role: content`` template, so that chat benchmarks' smoke runs take the real code path."""
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        return text + ("assistant: " if add_generation_prompt else "")


def tiny_model():
    """A 2-layer random Llama (GQA, RoPE) built in-process for smoke runs; seeded, so every worker builds the same."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=ByteTokenizer.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
    )
    return LlamaForCausalLM(config).eval(), ByteTokenizer()


@dataclass
class Spec:
    """What a worker builds: the model and one cache policy (``options`` as in ``CachePolicy.parse``)."""

    policy: str
    model: str = "smollm2"
    options: dict = field(default_factory=dict)
    device: str | None = None
    dtype: str | None = None
    threads: int = 1
    data_dir: str | None = None

    @property
    def label(self) -> str:
        """The policy name plus any non-default option, e.g. ``h2o_4_64_256[score_mode=sum]``."""
        extra = ",".join(f"{k}={v}" for k, v in sorted(self.options.items()))
        return f"{self.policy}[{extra}]" if extra else self.policy


class AttentionTimer:
    """Wall time spent inside the model's ``self_attn`` modules (projections, RoPE, cache update + eviction and the
    attention itself), via forward pre/post hooks."""

    def __init__(self, model):
        self.total_s = 0.0
        self._start = 0.0
        for name, module in model.named_modules():
            if name.endswith("self_attn"):
                module.register_forward_pre_hook(self._pre)
                module.register_forward_hook(self._post)

    def _pre(self, *_):
        self._start = time.perf_counter()

    def _post(self, *_):
        self.total_s += time.perf_counter() - self._start


def load_precision(args, dtype: str):
    """``load_model(args.model, args.device, dtype)``, or under ``--smoke`` the tiny model as ``load_model`` would
    give it: in ``dtype``'s compute dtype, with weight-only int8 / int4 Linears where ``dtype`` names them."""
    if not args.smoke:
        return load_model(args.model, device=args.device, dtype=dtype)
    model, tokenizer = tiny_model()
    model = model.to(resolve_dtype(dtype, "cpu"))
    return (quantize_weights(model, dtype) if dtype in WEIGHT_DTYPES else model), tokenizer


def process_memory() -> dict:
    """Peak and current RSS of this process, and the CUDA peak when on GPU."""
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    out = {"peak_rss_bytes": peak_kb * 1024, "rss_bytes": psutil.Process(os.getpid()).memory_info().rss}
    if torch.cuda.is_available():
        out["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
    return out


class Session:
    """One model + one cache policy; all methods return plain dicts/lists so they can cross a process pipe."""

    def __init__(self, spec: Spec):
        torch.set_num_threads(spec.threads)
        self.spec = spec
        self.smoke = spec.model == SMOKE_MODEL
        if self.smoke:
            self.model, self.tokenizer = tiny_model()
        else:
            self.model, self.tokenizer = load_model(spec.model, device=spec.device, dtype=spec.dtype)
        self.device = next(self.model.parameters()).device
        self.policy = CachePolicy.parse(spec.policy, **spec.options)
        make_cache(self.model, self.policy)  # installs the attention hook before the timer wraps the modules
        self.attn = AttentionTimer(self.model)
        self.stream: dict | None = None
        self.generation: dict | None = None
        self.chat: H2OCache | None = None
        self.reference: dict | None = None
        self.divergence: dict | None = None

    def tokens(self, row: str, n_tokens: int) -> list[int]:
        synthetic = self.smoke and not data_available(self.spec.data_dir)
        return tokenize(self.tokenizer, row, n_tokens, self.spec.data_dir, synthetic=synthetic)

    @torch.inference_mode()
    def _forward(self, cache, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, past_key_values=cache, use_cache=True).logits

    # -- teacher-forced streams ----------------------------------------------------------------------------------

    def start_stream(
        self,
        rows: list[str],
        n_tokens: int,
        step: int = 1,
        chunk_prefix: bool = True,
        scorers: Sequence[Scorer] | None = None,
    ) -> None:
        """Prepare a teacher-forced pass over the first ``n_tokens`` of each text row (one batch row each);
        ``scorers`` (one per layer) rank heavy hitters instead of the policy's rule."""
        ids = torch.tensor([self.tokens(r, n_tokens) for r in rows], device=self.device)
        cap = self.policy.capacity
        prefix = 0 if not chunk_prefix else (n_tokens if cap is None else min(cap, n_tokens))
        self.stream = {
            "ids": ids,
            "pos": 0,
            "prefix": prefix,
            "step": step,
            "cache": make_cache(self.model, self.policy, scorers=scorers),
            "nll": torch.zeros(len(rows), n_tokens - 1),
            "time_s": 0.0,
            "kv_bytes_max": 0,
            "kept_max": 0,
        }
        if self.reference is not None:
            self.stream["reference"] = ReferenceLogprobs(
                self.reference["path"], ids, self.model.config.vocab_size, write=self.reference["write"]
            )
            self.divergence = {"kl": torch.zeros(len(rows), n_tokens - 1), "top1": torch.zeros(len(rows), n_tokens - 1)}

    @torch.inference_mode()
    def _feed(self, n: int) -> float:
        """Feed the next ``n`` tokens in one forward; record the NLL of each one's next token. Returns seconds."""
        s = self.stream
        ids, a = s["ids"], s["pos"]
        b = min(ids.shape[1], a + n)
        t0 = time.perf_counter()
        logits = self._forward(s["cache"], ids[:, a:b]).float()
        n_targets = min(b, ids.shape[1] - 1) - a
        if n_targets > 0:
            logits = logits[:, :n_targets]
            target = ids[:, a + 1 : a + 1 + n_targets]
            nll = logits.logsumexp(-1) - logits.gather(-1, target[..., None]).squeeze(-1)
            s["nll"][:, a : a + n_targets] = nll.cpu()
        dt = time.perf_counter() - t0
        if n_targets > 0 and "reference" in s:  # after the clock: the pass time stays that of the cache alone
            self._compare(s["reference"], logits, a, n_targets)
        s["pos"], s["time_s"] = b, s["time_s"] + dt
        cache = s["cache"]
        s["kv_bytes_max"] = max(s["kv_bytes_max"], cache.nbytes() // ids.shape[0])
        s["kept_max"] = max(s["kept_max"], cache.kept_tokens())
        return dt

    def advance(self, n_tokens: int, n_timed_single: int = 0) -> dict:
        """Feed up to ``n_tokens`` more tokens: first ``n_timed_single`` one per forward (timed: TPOT), the rest
        in the stream's chunks. Returns what this call covered (target NLL sums, timings, cache and RSS state)."""
        s = self.stream
        start, end = s["pos"], min(s["ids"].shape[1], s["pos"] + n_tokens)
        single_s = []
        while s["pos"] < end:
            if len(single_s) < n_timed_single:
                single_s.append(self._feed(1))
            elif s["pos"] < s["prefix"]:
                self._feed(min(PREFIX_CHUNK, s["prefix"] - s["pos"], end - s["pos"]))
            else:
                self._feed(min(s["step"], end - s["pos"]))
        nll = s["nll"][:, start : min(end, s["ids"].shape[1] - 1)]
        cache = s["cache"]
        return {
            "start": start,
            "end": end,
            "done": end >= s["ids"].shape[1],
            "nll_sum": nll.sum().item(),
            "n_targets": nll.numel(),
            "single_s": single_s,
            "kv_bytes": cache.nbytes() // s["ids"].shape[0],
            "kept_tokens": cache.kept_tokens(),
            "evicted_tokens": cache.evicted_tokens,
            **process_memory(),
        }

    def _compare(self, reference: ReferenceLogprobs, logits: torch.Tensor, start: int, n_targets: int) -> None:
        """Write (reference mode) and/or compare the next-token distributions of targets ``start..+n_targets``."""
        if reference.write:
            reference.store(start, logits)
        ref_logprobs, ref_top1 = reference.load(start, n_targets)
        kl, agree = next_token_divergence(logits, ref_logprobs.to(logits.device), ref_top1.to(logits.device))
        self.divergence["kl"][:, start : start + n_targets] = kl.cpu()
        self.divergence["top1"][:, start : start + n_targets] = agree.float().cpu()

    def set_reference(self, path: str | None, write: bool = False) -> None:
        """Streams started from now on write their next-token log-probs to the folder ``path`` (``write``, the full
        cache's session) or compare theirs with what was written there, position by position (the writer must be
        ahead: run it first in each round-robin). ``None`` turns it off. Results: :meth:`divergence_result`."""
        self.reference = None if path is None else {"path": str(path), "write": write}

    def divergence_result(self) -> dict:
        """Per row, KL(reference || this cache) in nats and top-1 agreement (0/1) at each scored position of the
        last stream started with a reference (kept after :meth:`stream_result`, so ``ppl_pass`` can run as is)."""
        d, self.divergence = self.divergence, None
        return {"kl": d["kl"].tolist(), "top1": d["top1"].tolist()}

    def stream_result(self) -> dict:
        """Per-row NLL lists and the pass totals; frees the cache."""
        s, self.stream = self.stream, None
        return {
            "nll": s["nll"].tolist(),
            "time_s": s["time_s"],
            "kv_bytes_max": s["kv_bytes_max"],
            "kept_max": s["kept_max"],
            "evicted_tokens": s["cache"].evicted_tokens,
        }

    # -- generation timing ---------------------------------------------------------------------------------------

    @torch.inference_mode()
    def start_generation(self, row: str, prompt_tokens: int) -> float:
        """Prefill a ``prompt_tokens`` prompt (chunked by the policy) and pick the first new token greedily.
        Returns TTFT in seconds. :meth:`decode_step` then times one token at a time, so that a script can interleave
        the configs token by token (machine noise then hits every config's steps alike)."""
        ids = torch.tensor([self.tokens(row, prompt_tokens)], device=self.device)
        cache = make_cache(self.model, self.policy)
        self._sync()
        t0 = time.perf_counter()
        logits = self.model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
        token = logits[:, -1].argmax(-1, keepdim=True)
        self._sync()
        self.generation = {"cache": cache, "token": token}
        return time.perf_counter() - t0

    @torch.inference_mode()
    def decode_step(self) -> dict:
        """Feed the last token, pick the next greedily: wall seconds and seconds inside attention."""
        g = self.generation
        a0, t0 = self.attn.total_s, time.perf_counter()
        g["token"] = self._forward(g["cache"], g["token"])[:, -1].argmax(-1, keepdim=True)
        self._sync()
        return {"decode_s": time.perf_counter() - t0, "attn_s": self.attn.total_s - a0}

    def end_generation(self) -> int:
        """Frees the generation's cache; returns the bytes it had allocated."""
        cache, self.generation = self.generation["cache"], None
        return cache.nbytes()

    # -- chat recall ---------------------------------------------------------------------------------------------

    def chat_text(self, messages: list[dict], generation_prompt: bool = False) -> str:
        """``messages`` as the model's chat template renders them (the parent process has no tokenizer)."""
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def encode(self, texts: list[str]) -> list[list[int]]:
        return [self.tokenizer.encode(text, add_special_tokens=False) for text in texts]

    def start_chat(self) -> int:
        """Start an empty conversation cache; returns the positions the model was trained on."""
        self.chat = make_cache(self.model, self.policy)
        return self.model.config.max_position_embeddings

    @torch.inference_mode()
    def extend_chat(self, ids: list[int]) -> dict:
        """Append ``ids`` to the conversation in one call (the patched forward runs it in ``chunk_size`` chunks, as
        a server would feed a long turn). Returns the seconds it took and what the cache holds afterwards."""
        self._sync()
        t0 = time.perf_counter()
        self.model(
            input_ids=torch.tensor([ids], device=self.device),
            past_key_values=self.chat,
            use_cache=True,
            logits_to_keep=1,
        )
        self._sync()
        return {
            "time_s": time.perf_counter() - t0,
            "kv_bytes": self.chat.nbytes(),
            "kept_tokens": self.chat.kept_tokens(),
            "evicted_tokens": self.chat.evicted_tokens,
        }

    @torch.inference_mode()
    def probe(self, prompt_ids: list[int], answer_ids: list[int], max_new: int) -> dict:
        """Ask the conversation a question without changing it, each branch on its own copy of the cache: the
        log-probability of each token of ``answer_ids`` after ``prompt_ids`` (teacher-forced, one forward), and up
        to ``max_new`` greedy tokens after ``prompt_ids`` (stopping at EOS). ``max_position`` is the largest
        position id either branch gave a token."""
        self._sync()
        t0 = time.perf_counter()
        forced = copy.deepcopy(self.chat)
        logits = self._forward(forced, torch.tensor([prompt_ids + answer_ids], device=self.device))[0].float()
        answer = torch.tensor(answer_ids, device=self.device)
        token_logprobs = logits[len(prompt_ids) - 1 : -1].log_softmax(-1).gather(-1, answer[:, None]).squeeze(-1)
        max_position = _last_position(forced, self.device)
        del forced
        cache = copy.deepcopy(self.chat)
        logits = self.model(
            input_ids=torch.tensor([prompt_ids], device=self.device),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits
        generated: list[int] = []
        while True:
            token = int(logits[0, -1].argmax())
            if token == self.tokenizer.eos_token_id:
                break
            generated.append(token)
            if len(generated) == max_new:
                break
            logits = self._forward(cache, torch.tensor([[token]], device=self.device))
        self._sync()
        return {
            "token_logprobs": token_logprobs.tolist(),
            "generated": self.tokenizer.decode(generated),
            "max_position": max(max_position, _last_position(cache, self.device)),
            "time_s": time.perf_counter() - t0,
        }

    def end_chat(self) -> None:
        self.chat = None

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def memory(self) -> dict:
        return process_memory()


def next_token_divergence(
    logits: torch.Tensor, ref_logprobs: torch.Tensor, ref_top1: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(reference || model) of the next-token distribution, in nats, and whether the model's argmax is the
    reference's, per position (``logits`` and ``ref_logprobs`` are ``(..., vocab)``). The reference log-probs are
    stored in fp16, so they are renormalized first: the full cache against its own stored log-probs then reads the
    rounding's second-order error (~1e-6 nats), not its first-order one."""
    ref = ref_logprobs.float().log_softmax(-1)
    own = logits.float().log_softmax(-1)
    kl = (ref.exp() * (ref - own)).sum(-1).clamp_min(0.0)
    return kl, own.argmax(-1) == ref_top1


class ReferenceLogprobs:
    """The reference run's next-token log-probs (fp16, ``(rows, targets, vocab)``) and argmax (from fp32 logits) as
    memory-mapped ``.npy`` files in a folder, plus the token ids they were computed on (a reader on other tokens
    fails) and how many targets are written (a reader ahead of the writer fails instead of reading zeros)."""

    def __init__(self, path: str | Path, ids: torch.Tensor, vocab: int, write: bool):
        self.path, self.write = Path(path), write
        rows, n_targets = ids.shape[0], ids.shape[1] - 1
        open_memmap = np.lib.format.open_memmap
        if write:
            self.path.mkdir(parents=True, exist_ok=True)
            np.save(self.path / "ids.npy", ids.cpu().numpy())
            self.logprobs = open_memmap(self.path / "logprobs.npy", "w+", np.float16, (rows, n_targets, vocab))
            self.top1 = open_memmap(self.path / "top1.npy", "w+", np.int64, (rows, n_targets))
            self.written = open_memmap(self.path / "written.npy", "w+", np.int64, (1,))
            self.written[0] = 0
            return
        if not np.array_equal(np.load(self.path / "ids.npy"), ids.cpu().numpy()):
            raise ValueError(f"the reference in {self.path} was computed on other tokens")
        self.logprobs = open_memmap(self.path / "logprobs.npy", "r")
        self.top1 = open_memmap(self.path / "top1.npy", "r")
        self.written = open_memmap(self.path / "written.npy", "r")

    def store(self, start: int, logits: torch.Tensor) -> None:
        n = logits.shape[1]
        self.logprobs[:, start : start + n] = logits.float().log_softmax(-1).to(torch.float16).cpu().numpy()
        self.top1[:, start : start + n] = logits.argmax(-1).cpu().numpy()
        self.written[0] = start + n  # targets are written in order, each once

    def load(self, start: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.written[0] < start + n:
            raise RuntimeError(
                f"reference has {int(self.written[0])} targets written, {start + n} needed: "
                "advance the writing session first"
            )
        return (
            torch.from_numpy(np.array(self.logprobs[:, start : start + n])),
            torch.from_numpy(np.array(self.top1[:, start : start + n])),
        )


def data_available(data_dir: str | None) -> bool:
    """Whether every text is in the data folder (smoke runs fall back to synthetic text where it is not)."""
    return all((resolve_data_dir(data_dir) / f).is_file() for f in FILES.values())


def _last_position(cache: H2OCache, device: torch.device) -> int:
    """The position id the cache gave its latest token (the full cache's count of tokens seen minus one; with
    position rolling, a position inside the kept tokens)."""
    return int(cache.next_positions(None, 1, device).max()) - 1
