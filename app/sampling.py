"""Per-request sampling: temperature, top-k, nucleus (top-p), seeds and suppressed tokens.

It runs once per generated token and row, next to a batched forward that costs a few hundred ms for 16 rows on a
CPU, so it must stay cheap: a float64 sort of SmolLM2's 49k-token vocabulary per row used to cost ~14 ms, more than
the forward's share of a row. The nucleus is therefore looked for among the top few hundred tokens first, and the
whole vocabulary is sorted only when the nucleus is wider than that.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# float32 logits that differ at all differ by more than 1e-30 relative to their size, so a larger 1/temperature
# (temperature 1e-300 is allowed) separates nothing more; it only has to stay finite to keep 0 * (1/T) = 0.
_MAX_INV_TEMPERATURE = 1e30
_NUCLEUS_PROBE = 256  # top tokens searched for the nucleus before falling back to a full sort


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    min_new_tokens: int = 0
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    top_logprobs: int | None = None
    """None: no log-probabilities; n: the sampled token's and the n most likely tokens' (see `logprobs`)."""


def candidates(logits: torch.Tensor, params: SamplingParams) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The tokens a draw may pick and their probabilities: ``(ids, probs)``, best first, or ``(None, probs)`` over
    the whole vocabulary when neither top-k nor top-p restricts it. Temperature > 0."""
    scaled = (logits.float() - logits.max()) * min(1.0 / params.temperature, _MAX_INV_TEMPERATURE)
    vocab = scaled.numel()
    if 0 < params.top_k < vocab:  # the top-k distribution, best first; top-p then applies within it
        values, ids = scaled.topk(params.top_k)
        if params.top_p >= 1.0:
            return ids, values.softmax(-1)
        return _nucleus(values, ids, values.logsumexp(-1), params.top_p)
    if params.top_p >= 1.0:
        return None, scaled.softmax(-1)
    log_norm = scaled.logsumexp(-1)
    values, ids = scaled.topk(min(vocab, _NUCLEUS_PROBE))
    probs = (values - log_norm).exp()
    if len(values) < vocab and probs[:-1].sum() <= params.top_p:  # the nucleus reaches past the probe
        values, ids = scaled.sort(descending=True)
    return _nucleus(values, ids, log_norm, params.top_p)


def _nucleus(
    values: torch.Tensor, ids: torch.Tensor, log_norm: torch.Tensor, top_p: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Of candidates sorted best first (log-probabilities ``values - log_norm``), those reached while the mass
    before them is <= top_p, renormalised."""
    probs = (values - log_norm).exp()
    keep = int((probs.cumsum(-1) - probs <= top_p).sum())
    return ids[:keep], values[:keep].softmax(-1)


def logprobs(logits: torch.Tensor, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """The model's log-probability of `token` and the `top` most likely (id, log-probability) pairs, from the raw
    `logits` (vocab,): the distribution before temperature, top-k, top-p and suppressed tokens, as vLLM reports."""
    log_probs = logits.float().log_softmax(-1)
    values, ids = log_probs.topk(top) if top else (log_probs[:0], log_probs[:0].long())
    return float(log_probs[token]), list(zip(ids.tolist(), values.tolist()))


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator, suppress_ids: list[int]) -> int:
    """Pick the next token from `logits` (vocab,): greedy when temperature is 0, else a draw from `generator`
    among `candidates`. `suppress_ids` can never be picked."""
    if suppress_ids:
        logits = logits.index_fill(0, torch.tensor(suppress_ids, device=logits.device), float("-inf"))
    if params.temperature == 0:
        return int(logits.argmax())
    ids, probs = candidates(logits, params)
    choice = int(torch.multinomial(probs, 1, generator=generator))
    return choice if ids is None else int(ids[choice])
