"""The output processor: a step's logits -> a turn's next token and its event. It samples, detokenizes, checks the
end-of-turn token, the stop strings and the length limit, and computes the logprobs a request asked for."""

from __future__ import annotations

import time

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from app.generation import Generation
from app.metrics import Metrics
from app.protocol import Logprob, TokenEvent
from app.sampling import logprobs, sample


class OutputProcessor:
    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, metrics: Metrics) -> None:
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.eos_ids = sorted(_eos_ids(model, tokenizer))

    def take(self, g: Generation, logits: torch.Tensor) -> str | None:
        """Sample the next token from `logits` (vocab,) and emit it; the finish reason, or None to go on."""
        if g.generator is None:
            g.generator = torch.Generator(device=logits.device)
            if g.params.seed is None:
                g.generator.seed()
            else:
                g.generator.manual_seed(g.params.seed)
        suppress = self.eos_ids if len(g.output_ids) < g.params.min_new_tokens else []
        token = sample(logits, g.params, g.generator, suppress)
        previous, g.last_token_at = g.last_token_at, time.perf_counter()
        if previous is not None:
            self.metrics.inter_token_latency.observe(g.last_token_at - previous)
        g.first_token_at = g.first_token_at or g.last_token_at
        g.output_ids.append(token)
        is_eos = token in self.eos_ids
        text = "" if is_eos else g.decoder.push(token)
        reason = None
        if is_eos or g.decoder.stopped:
            reason = "stop"
        elif len(g.output_ids) >= g.params.max_new_tokens:
            reason = "length"
        if reason is not None:
            text += g.decoder.flush()
        if text or not is_eos:
            g.emit(TokenEvent(text=text, token_id=token, **self._logprobs(logits, token, g.params.top_logprobs)))
        return reason

    def ends_with_eos(self, g: Generation) -> bool:
        return bool(g.output_ids) and g.output_ids[-1] in self.eos_ids

    def raw(self, ids: list[int]) -> str:
        """Exact text of `ids`, special tokens included: what the chat template must reproduce."""
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def _logprobs(self, logits: torch.Tensor, token: int, top: int | None) -> dict:
        """A token event's `logprob` and `top_logprobs` fields (none unless the request asked)."""
        if top is None:
            return {}
        sampled, alternatives = logprobs(logits, token, top)
        ids = [token] + [i for i, _ in alternatives]
        texts = self.tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=False)
        return {
            "logprob": Logprob(token_id=token, token=texts[0], logprob=sampled),
            "top_logprobs": [Logprob(token_id=i, token=t, logprob=lp) for (i, lp), t in zip(alternatives, texts[1:])]
            if top
            else None,
        }


def _eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """End-of-turn tokens: the tokenizer's EOS plus the generation config's (an int or a list)."""
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids = set(configured if isinstance(configured, list) else [configured])
    ids.add(tokenizer.eos_token_id)
    return {i for i in ids if i is not None}
