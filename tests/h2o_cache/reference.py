"""A plainly written reference of every policy, to check the vectorised cache against.

The model runs with a full DynamicCache at absolute positions; this module's attention function then does, head by
head and query by query, what the policy says: attend over the kept tokens only (re-rotated to their rank in the
kept list when rolling), accumulate each kept token's attention, and evict with the same timing rules as the cache.
"""

from __future__ import annotations

import math

import torch
from transformers import AttentionInterface, DynamicCache

from h2o_cache import CachePolicy, RotaryDelta, make_cache

from .models import VOCAB, tiny_model

NAME = "h2o_reference"


def _rotate(x: torch.Tensor, delta: float, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate one vector's rotary part by ``delta`` positions (pairs ``i`` and ``i + r/2``)."""
    r = 2 * inv_freq.numel()
    out = x.clone()
    for i, freq in enumerate(inv_freq.tolist()):
        angle = delta * freq
        a, b = x[i].item(), x[i + r // 2].item()
        out[i] = a * math.cos(angle) - b * math.sin(angle)
        out[i + r // 2] = b * math.cos(angle) + a * math.sin(angle)
    return out


class HeadState:
    """What one (layer, KV head) keeps: token indices in order, attention received (summed, or the last query's
    for TOVA), observing queries."""

    def __init__(self) -> None:
        self.kept: list[int] = []
        self.acc: dict[int, float] = {}
        self.obs: dict[int, int] = {}

    def scores(self, mode: str, keys: list[torch.Tensor]) -> dict[int, float]:
        """Each kept token's score; ``keys`` are the kept tokens' keys as the model sees them."""
        if mode == "keydiff":  # -cos(key, mean of the unit keys)
            unit = [k / k.norm() for k in keys]
            anchor = sum(unit) / len(unit)
            return {t: -float(u @ anchor / anchor.norm()) for t, u in zip(self.kept, unit)}
        if mode == "mean":
            return {t: self.acc[t] / max(self.obs[t], 1) for t in self.kept}
        return dict(self.acc)

    def evict(self, policy: CachePolicy, n_keep: int, keys: list[torch.Tensor]) -> None:
        sinks = self.kept[: policy.n_sink]
        recent = self.kept[len(self.kept) - policy.n_recent :] if policy.n_recent else []
        middle = [t for t in self.kept if t not in sinks and t not in recent]
        n_heavy = n_keep - len(sinks) - len(recent)
        score = self.scores(policy.score_mode, keys)
        heavy = sorted(middle, key=score.get, reverse=True)[:n_heavy]
        if not policy.needs_scores:
            heavy = []
        self.kept = sorted(sinks + recent + heavy)


class ReferencePolicy:
    """Runs a model token chunk by token chunk under ``policy``, batch 1, the slow and obvious way."""

    def __init__(self, model, policy: CachePolicy):
        self.model, self.policy = model, policy
        text = model.config.get_text_config()
        n_kv = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        self.heads = [[HeadState() for _ in range(n_kv)] for _ in range(text.num_hidden_layers)]
        self.inv_freq = RotaryDelta.from_model(model).inv_freq.double()
        self.cache = DynamicCache(config=model.config)
        self.seen = 0
        AttentionInterface.register(NAME, self._attention)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Feed ``ids`` (1, q) in chunks of ``chunk_size``; returns the logits of every position."""
        previous = self.model.config._attn_implementation
        self.model.set_attn_implementation(NAME)
        try:
            logits = []
            for start in range(0, ids.shape[1], self.policy.chunk_size):
                chunk = ids[:, start : start + self.policy.chunk_size]
                out = self.model(chunk, past_key_values=self.cache, use_cache=True)
                self.seen += chunk.shape[1]
                logits.append(out.logits)
            return torch.cat(logits, dim=1)
        finally:
            self.model.set_attn_implementation(previous)

    def _attention(self, module, query, key, value, attention_mask, scaling=None, **kwargs):
        policy = self.policy
        cap, slack = policy.capacity, policy.slack
        _, n_heads, q, d = query.shape
        n_kv = key.shape[1]
        group = n_heads // n_kv
        new = list(range(self.seen, self.seen + q))
        out = torch.zeros(1, q, n_heads, d, dtype=query.dtype)
        for h, state in enumerate(self.heads[module.layer_idx]):
            if len(state.kept) > cap and len(state.kept) + q > cap + max(slack, q):
                state.evict(policy, cap, self._keys_as_seen(key[0, h], state.kept))
            if policy.score_mode == "ema":
                for k in state.kept:
                    state.acc[k] *= policy.decay**q
            state.kept += new
            for t in new:
                state.acc[t], state.obs[t] = 0.0, 0
            for i, t in enumerate(new):
                visible = [k for k in state.kept if k <= t]
                keys_at = torch.stack(self._keys_as_seen(key[0, h], visible))
                q_pos = state.kept.index(t)
                if policy.score_mode == "tova":  # only the newest query counts
                    state.acc = dict.fromkeys(state.kept, 0.0)
                for g in range(group):
                    head = h * group + g
                    qv = query[0, head, i].double()
                    if policy.rolling:
                        qv = _rotate(qv, q_pos - t, self.inv_freq)
                    probs = torch.softmax(keys_at @ qv * scaling, dim=0)
                    out[0, i, head] = (probs @ value[0, h, visible].double()).to(query.dtype)
                    for k, p in zip(visible, probs.tolist()):
                        state.acc[k] += p
                for k in visible:
                    state.obs[k] += 1
            if len(state.kept) > cap + slack:
                state.evict(policy, cap, self._keys_as_seen(key[0, h], state.kept))
        return out, None

    def _keys_as_seen(self, keys: torch.Tensor, tokens: list[int]) -> list[torch.Tensor]:
        """``tokens``' keys (a prefix of the kept list) as the model sees them: the model rotated them at absolute
        positions; with rolling, move each to its rank among the kept tokens."""
        if not self.policy.rolling:
            return [keys[t].double() for t in tokens]
        return [_rotate(keys[t].double(), j - t, self.inv_freq) for j, t in enumerate(tokens)]

    def kept(self, layer: int, head: int) -> list[int]:
        return self.heads[layer][head].kept


def assert_matches_reference(family: str, policy: CachePolicy) -> None:
    """A 30-token prompt (chunks of ``policy.chunk_size``) and 25 decode steps through the cache and through the
    reference, on an fp64 model: the same tokens kept after every step, the same logits."""
    model = tiny_model(family, dtype=torch.float64)
    torch.manual_seed(2)
    prompt = torch.randint(0, VOCAB, (1, 30))
    steps = torch.randint(0, VOCAB, (1, 25))
    reference = ReferencePolicy(model, policy)
    cache = make_cache(model, policy)
    with torch.no_grad():
        want = [reference.forward(prompt)[:, -1]]
        got = [model(prompt, past_key_values=cache, use_cache=True).logits[:, -1]]
        for i in range(steps.shape[1]):
            want.append(reference.forward(steps[:, i : i + 1])[:, -1])
            got.append(model(steps[:, i : i + 1], past_key_values=cache, use_cache=True).logits[:, -1])
            for layer_idx, layer in enumerate(cache.layers):
                kept = layer.slot("position")[0]
                for head in range(kept.shape[0]):
                    assert kept[head].tolist() == reference.kept(layer_idx, head), (i, layer_idx, head)
    assert cache.evicted_tokens > 0
    # fp64 model, but transformers computes RoPE angles in fp32: agreement to ~1e-8, not 1e-15.
    torch.testing.assert_close(torch.stack(got), torch.stack(want), rtol=1e-6, atol=1e-7)
