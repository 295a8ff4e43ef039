"""Bounded KV cache storage: one :class:`H2OLayer` per model layer inside an :class:`H2OCache`.

Each layer's storage grows in pages of ``PAGE`` slots up to ``capacity + slack`` (another ``slack`` when rows hold
padding, as in a pool), so a short session holds only the pages it uses; new tokens are written in place (a
prefill chunk grows the buffers to ``capacity + chunk`` for that forward only). Next to the keys and values it keeps,
per (batch row, KV head, slot): the token's original position (its rank among the row's valid tokens), a validity
flag (padding) and the accumulated attention.

Keys and values are stored as ``policy.kv_dtype`` says (:mod:`h2o_cache.quant`). When that is not the model's dtype,
the stored codes never change after they are written (eviction gathers them, nothing re-quantizes), and attention
reads a working copy in the model's dtype: the decoded codes, keys rotated from the position they were stored at
(``rot_pos``) to their position now. The working copy exists only while the layer is in use; :meth:`release_working`
drops it (a session at rest holds only its codes) and the next forward rebuilds it. Position rolling therefore never
accumulates error: a key kept through any number of evictions is one rotation away from its quantized value. In
``mean`` mode the number of queries that saw a slot is derived, not stored: every valid query after a token sees it,
so it is ``valid tokens seen - position``. When a row grows past ``capacity + slack`` it is cut back to ``capacity``
in one gather of that row alone; with position rolling the surviving keys are
re-rotated so that a slot's position is its rank among the row's valid slots.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, CacheLayerMixin

from h2o_cache import attention
from h2o_cache.policy import CachePolicy
from h2o_cache.quant import Codec, FloatCodec, make_codec
from h2o_cache.rope import RotaryDelta
from h2o_cache.scorers import Scorer, scorer_for
from h2o_cache.scoring import select_kept

# Score queries in blocks so that a block's probabilities stay under this many fp32 elements (~64 MB).
_SCORE_BLOCK_ELEMENTS = 1 << 24
# At most this many queries per block, so that each block computes only the keys its queries may see (a prompt's
# first chunk then skips ~40% of the QK^T and softmax work above the causal diagonal).
_CAUSAL_BLOCK = 128
PAGE = 64
"""Slots a layer's storage grows by."""
_WORK = "work_"
"""Prefix of the working (decoded) keys and values: in-use buffers, not part of what a session holds."""


def slot_fields(
    codecs: dict[str, Codec], dims: dict[str, int], scores: bool, tracks_rotation: bool
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every per-slot tensor a layer stores for a session: name -> (trailing shape, dtype)."""
    fields: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for kind, codec in codecs.items():
        for suffix, (size, dtype) in codec.fields(dims[kind]).items():
            fields[kind + suffix] = ((size,), dtype)
    fields["position"] = ((), torch.int32)
    fields["valid"] = ((), torch.bool)
    if scores:
        fields["scores"] = ((), torch.float32)
    if tracks_rotation:
        fields["rot_pos"] = ((), torch.int32)
    return fields


def _gather_slots(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Pick slots along the slot dim (the one after the KV-head dim) of a per-slot tensor, with or without a
    trailing feature dim: ``index`` has the tensor's shape up to and including the slot dim."""
    if tensor.dim() == index.dim():
        return tensor.gather(index.dim() - 1, index)
    return tensor.gather(index.dim() - 1, index[..., None].expand(*index.shape, tensor.shape[-1]))


class H2OLayer(CacheLayerMixin):
    """One layer's bounded cache. ``keys``/``values`` are views ``(batch, kv_heads, n_slots, head_dim)`` of the
    slots in use; ``seen`` counts every token appended (the sequence length transformers sees)."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, policy: CachePolicy, rotary: RotaryDelta | None = None, scorer: Scorer | None = None):
        super().__init__()
        self.policy = policy
        self.rotary = rotary
        self.scorer = scorer if scorer is not None else scorer_for(policy)  # ranks heavy hitters (h2o policies)
        self.length = 0  # slots in use (valid or not), shared by the rows
        self.seen = 0
        self.has_padding = False
        self.row_valid: list[int] = []  # valid slots per row, on the host: eviction decisions need no device sync
        self.row_evicted: list[int] = []  # tokens evicted per row
        self.new_valid: torch.Tensor | None = None  # (batch, q_len) validity of the tokens of the current forward
        self.new_counts: list[int] = []  # valid tokens per row in the current forward
        self._valid_seen: torch.Tensor | None = None  # (batch,) valid tokens appended so far
        self._slots: dict[str, torch.Tensor] = {}
        self._fields: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self.codecs: dict[str, Codec] = {}
        self.direct = True  # keys and values stored in the model's dtype: attention reads the storage itself
        self.working = False  # the decoded working copy exists (only when not direct)
        self._batch = self._kv_heads = 0
        self._dims: dict[str, int] = {}

    # -- storage -------------------------------------------------------------------------------------------------

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, q, key_dim = key_states.shape
        self._init_storage(b, h, key_dim, value_states.shape[-1], key_states.dtype, key_states.device, q)

    def _init_storage(
        self,
        batch: int,
        kv_heads: int,
        key_dim: int,
        value_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        n_tokens: int,
    ) -> None:
        """Choose the codecs for a model computing in ``dtype`` and allocate the pages ``n_tokens`` need."""
        self.dtype, self.device = dtype, device
        self.is_initialized = True
        self._batch, self._kv_heads = batch, kv_heads
        self._dims = {"keys": key_dim, "values": value_dim}
        self.codecs = {kind: make_codec(self.policy.kv_dtype, dtype, dim, kind) for kind, dim in self._dims.items()}
        self.direct = all(codec == FloatCodec(dtype) for codec in self.codecs.values())
        tracks_rotation = not self.direct and self.rotary is not None
        scores = self.policy.needs_scores and self.scorer.needs_attention
        self._fields = slot_fields(self.codecs, self._dims, scores, tracks_rotation)
        self._allocate(self._grow_target(n_tokens))

    def _allocate(self, n_slots: int) -> None:
        """(Re)allocate every per-slot tensor with ``n_slots`` slots, keeping the slots in use."""
        b, h = self._batch, self._kv_heads
        fields = dict(self._fields)
        if self.working:
            fields.update({_WORK + kind: ((dim,), self.dtype) for kind, dim in self._dims.items()})
        new = {
            name: torch.zeros(b, h, n_slots, *shape, dtype=dtype, device=self.device)
            for name, (shape, dtype) in fields.items()
        }
        new["valid"].fill_(True)
        if self._valid_seen is None:
            self._valid_seen = torch.zeros(b, dtype=torch.int64, device=self.device)
            self.row_valid, self.row_evicted = [0] * b, [0] * b
        for name, old in self._slots.items():
            new[name][:, :, : self.length] = old[:, :, : self.length]
        self._slots = new
        self._refresh_views()

    def _grow_target(self, need: int) -> int:
        """Slots to allocate for ``need`` slots in use: whole pages, at most the steady size of a bounded layer
        (more only for a prefill chunk's forward)."""
        pages = -(-max(need, 1) // PAGE) * PAGE
        return pages if self.policy.capacity is None else max(need, min(pages, self._steady_slots))

    def _set_working(self, on: bool) -> None:
        """Create (decoding every slot in use) or drop the working copy of a layer that is not ``direct``."""
        if self.direct or on == self.working:
            return
        self.working = on
        if on:
            for kind, dim in self._dims.items():
                self._slots[_WORK + kind] = torch.zeros(
                    self._batch, self._kv_heads, self.n_slots, dim, dtype=self.dtype, device=self.device
                )
            self._materialize()
        else:
            for kind in self._dims:
                del self._slots[_WORK + kind]
        self._refresh_views()

    def release_working(self) -> None:
        """Free the decoded working copy (a session at rest holds only its stored codes)."""
        self._set_working(False)

    def _decoded(self, kind: str, slots: dict[str, torch.Tensor]) -> torch.Tensor:
        """Decode ``kind`` (keys or values) from the stored codes in ``slots`` (per-slot tensors of some rows)."""
        codec = self.codecs[kind]
        return codec.decode({suffix: slots[kind + suffix] for suffix in codec.fields(self._dims[kind])}, self.dtype)

    def _current_keys(
        self, keys: torch.Tensor, slots: dict[str, torch.Tensor], model_pos: torch.Tensor
    ) -> torch.Tensor:
        """Decoded ``keys`` rotated from the position they were stored at to ``model_pos``."""
        if "rot_pos" not in slots:
            return keys
        return self.rotary.rotate(keys, model_pos - slots["rot_pos"])

    def _materialize(self, rows: list[int] | None = None) -> None:
        """Rebuild the working copy of ``rows`` (default: all) from the stored codes."""
        sel = slice(None) if rows is None else torch.tensor(rows, device=self.device)
        slots = {name: t[sel, :, : self.length] for name, t in self._slots.items()}
        model_pos = self._model_positions().expand(self._batch, self._kv_heads, self.length)[sel]
        keys = self._current_keys(self._decoded("keys", slots), slots, model_pos)
        self._slots[_WORK + "keys"][sel, :, : self.length] = keys
        self._slots[_WORK + "values"][sel, :, : self.length] = self._decoded("values", slots)

    @property
    def _steady_slots(self) -> int:
        """Slots a bounded layer keeps between prefill chunks: ``capacity + slack`` (at least one over capacity: a
        decode appends before it cuts), plus another ``slack`` of headroom when rows may hold padding (a pool),
        so that the rows' cuts at different steps leave gaps that need squeezing out only every ``slack`` steps."""
        p = self.policy
        return p.capacity + max(p.slack, 1) + (p.slack if self.has_padding else 0)

    def _refresh_views(self) -> None:
        prefix = "" if self.direct else _WORK
        if prefix + "keys" in self._slots:
            self.keys = self._slots[prefix + "keys"][:, :, : self.length]
            self.values = self._slots[prefix + "values"][:, :, : self.length]
        else:
            self.keys = self.values = None

    def slot(self, name: str) -> torch.Tensor:
        """The in-use part of a per-slot tensor: ``keys``, ``values`` (codes), ``position`` (original), ``valid``,
        ``scores``; with integer storage also ``keys_scale`` etc., with rolling ``rot_pos``."""
        return self._slots[name][:, :, : self.length]

    @property
    def n_slots(self) -> int:
        return self._slots["keys"].shape[2] if self._slots else 0

    def nbytes(self) -> int:
        """Bytes this layer holds for its rows: codes, scales and bookkeeping (not the working copy)."""
        return sum(t.numel() * t.element_size() for name, t in self._slots.items() if name in self._fields)

    def working_nbytes(self) -> int:
        """Bytes of the decoded working copy (0 when direct or released)."""
        return sum(t.numel() * t.element_size() for name, t in self._slots.items() if name not in self._fields)

    def _write(self, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store new keys and values from slot ``start`` on (and their decoded form in the working copy). Keys and
        values that share a codec and a shape are encoded in one call: a decode step runs this in every layer,
        and the codec's cost there is its number of small ops, not their size."""
        q = keys.shape[2]
        if self.direct:
            self._slots["keys"].narrow(2, start, q).copy_(keys)
            self._slots["values"].narrow(2, start, q).copy_(values)
            return
        if self.codecs["keys"] == self.codecs["values"] and keys.shape == values.shape:
            parts, decoded = self.codecs["keys"].encode(torch.stack((keys, values)), self.dtype)
            encoded = {
                kind: ({suffix: t[i] for suffix, t in parts.items()}, decoded[i])
                for i, kind in enumerate(("keys", "values"))
            }
        else:
            encoded = {
                kind: self.codecs[kind].encode(states, self.dtype)
                for kind, states in (("keys", keys), ("values", values))
            }
        for kind, (parts, decoded) in encoded.items():
            for suffix, tensor in parts.items():
                self._slots[kind + suffix].narrow(2, start, q).copy_(tensor)
            self._slots[_WORK + kind].narrow(2, start, q).copy_(decoded)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``(batch, kv_heads, q_len, head_dim)`` new keys/values in place and return all slots in use."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q = key_states.shape[-2]
        bounded = self.policy.capacity is not None
        if self.length + q > self.n_slots and self.has_padding and bounded and self.n_slots >= self._steady_slots:
            self._compact(list(self.row_valid))  # drop padding slots only
        if self.length + q > self.n_slots:
            self._allocate(self._grow_target(self.length + q))
        self._set_working(True)
        start, end = self.length, self.length + q
        s = self._slots
        self._write(start, key_states, value_states)
        new_valid = self.new_valid
        if "rot_pos" in s:  # the position the model rotated the new keys to: their rank among the valid slots
            if new_valid is None and len(self.row_valid) == 1 and q == 1:  # the decode hot path: one fill
                s["rot_pos"][:, :, start].fill_(self.row_valid[0])
            elif new_valid is None and len(self.row_valid) == 1:
                s["rot_pos"][:, :, start:end] = torch.arange(q, device=self.device) + self.row_valid[0]
            else:
                offsets = torch.arange(q, device=self.device) if new_valid is None else new_valid.long().cumsum(-1) - 1
                base = torch.tensor(self.row_valid, device=self.device)[:, None]
                s["rot_pos"][:, :, start:end] = (base + offsets)[:, None]
        if new_valid is None and q == 1:  # the decode hot path: no temporaries
            s["position"][:, :, start].copy_(self._valid_seen[:, None])
            self._valid_seen += 1
        elif new_valid is None:
            s["position"][:, :, start:end] = (self._valid_seen[:, None] + torch.arange(q, device=self.device))[:, None]
            self._valid_seen += q
        else:
            positions = self._valid_seen[:, None] + new_valid.long().cumsum(-1) - 1
            s["position"][:, :, start:end] = positions[:, None, :]
            self._valid_seen += new_valid.sum(-1)
            self.has_padding = True
        if self.has_padding:
            s["valid"][:, :, start:end] = True if new_valid is None else new_valid[:, None, :]
        if "scores" in s:
            s["scores"][:, :, start:end] = 0
        self.length, self.seen = end, self.seen + q
        self.row_valid = [v + c for v, c in zip(self.row_valid, self._new_counts(q))]
        self._refresh_views()
        attention.set_active_layer(self)
        return self.keys, self.values

    # -- attention + scoring -------------------------------------------------------------------------------------

    def _mask(self, q: int, window: int | None = None) -> torch.Tensor | None:
        """Boolean mask ``(batch|1, kv_heads|1, q, n)``: new tokens are causal among themselves, padding is hidden,
        and with a sliding ``window`` (Mistral, Qwen2's sliding layers) a query sees only keys whose position, as
        the model numbered them (rolled or original), is within ``window`` of its own. Each query may always see
        itself, so padding rows never softmax over nothing."""
        n = self.length
        if not self.has_padding and q == 1 and window is None:
            return None
        rows = torch.arange(q, device=self.device)[:, None]
        cols = torch.arange(n, device=self.device)[None, :]
        allowed = (cols <= rows + (n - q))[None, None]
        if window is not None:
            positions = self._model_positions()
            allowed = allowed & (positions[:, :, None, :] > positions[:, :, n - q :, None] - window)
        if not self.has_padding:
            return allowed
        valid = self.slot("valid")[:, :, None, :]
        return (valid & allowed) | (cols == rows + (n - q))

    def _model_positions(self) -> torch.Tensor:
        """``(batch|1, kv_heads|1, n)`` position of each slot as the model numbered it: its rank among the valid
        slots when rolling, else its original position."""
        if self.policy.rolling:
            if not self.has_padding:
                return torch.arange(self.length, device=self.device)[None, None]
            return self.slot("valid").long().cumsum(-1) - 1
        return self.slot("position")

    def _effective_window(self, window: int | None) -> int | None:
        """``window`` if it can hide a slot, i.e. if positions may span more than it, else None (a bounded cache
        that rolls its positions below the window never pays for the window mask)."""
        span = self.length if self.policy.rolling else self.seen
        return window if window is not None and span > window else None

    def attend(self, query: torch.Tensor, scaling: float | None, sliding_window: int | None = None) -> torch.Tensor:
        """Attention of ``query`` ``(batch, heads, q_len, head_dim)`` over the slots in use; accumulates scores and
        evicts when over budget. Returns ``(batch, q_len, heads, head_dim)`` like transformers' SDPA path."""
        q, d = query.shape[2], query.shape[3]
        scale = scaling if scaling is not None else 1.0 / math.sqrt(d)
        new_valid = self.new_valid if self.has_padding else None
        window = self._effective_window(sliding_window)
        mask = self._mask(q, window)
        attends = self.policy.needs_scores and self.scorer.needs_attention
        if attends:
            self.scorer.before_forward(self.slot("scores"), q, new_valid)
        if not attends:
            out = self._sdpa(query, mask, scale, causal=window is None)
        elif q == 1:
            out = self._decode_with_scores(query, mask, scale, new_valid)
        else:
            out = self._prefill_with_scores(query, mask, scale, new_valid)
        cap = self.policy.capacity
        if cap is not None and max(self.row_valid) > cap + self.policy.slack:
            self._compact([cap if v > cap + self.policy.slack else v for v in self.row_valid])
            if self.length <= self._steady_slots < self.n_slots:  # a prefill chunk grew the buffers
                self._allocate(self._grow_target(self.length))
        return out.transpose(1, 2).contiguous()

    def _sdpa(self, query: torch.Tensor, mask: torch.Tensor | None, scale: float, causal: bool) -> torch.Tensor:
        """``causal``: the mask is plain causal where it exists (no sliding window), so a prompt alone in the cache
        may take SDPA's fused causal path."""
        hq, hk, q = query.shape[1], self.keys.shape[1], query.shape[2]
        is_causal = causal and q > 1 and q == self.length and not self.has_padding
        if is_causal:
            mask = None
        elif mask is not None and mask.shape[1] > 1:  # per-KV-head padding mask -> per query head
            mask = mask.repeat_interleave(hq // hk, dim=1)
        return F.scaled_dot_product_attention(
            query, self.keys, self.values, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=hq != hk
        )

    def _decode_with_scores(
        self, query: torch.Tensor, mask: torch.Tensor | None, scale: float, new_valid: torch.Tensor | None
    ) -> torch.Tensor:
        """One query token: the probabilities serve both the output and the scores (no second QK^T)."""
        b, hq, _, d = query.shape
        hk = self.keys.shape[1]
        qg = query.view(b, hk, hq // hk, d) * scale
        logits = torch.matmul(qg, self.keys.transpose(-1, -2))  # (b, hk, g, n)
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf"))  # (b, hk, 1, n) broadcasts over the group
        probs = logits.softmax(dim=-1, dtype=torch.float32)
        self.scorer.accumulate(self.slot("scores"), probs[:, :, :, None, :], new_valid)
        out = torch.matmul(probs.to(self.values.dtype), self.values)  # (b, hk, g, d)
        return out.view(b, hq, 1, d)

    def _prefill_with_scores(
        self, query: torch.Tensor, mask: torch.Tensor, scale: float, new_valid: torch.Tensor | None
    ) -> torch.Tensor:
        """Several query tokens, in query blocks (never a full q x n matrix): each block's probabilities give both
        its output and, through the scorer, the scores of the slots it sees."""
        b, hq, q, d = query.shape
        hk, n = self.keys.shape[1], self.length
        qg = query.view(b, hk, hq // hk, q, d) * scale
        keys_t = self.keys.transpose(-1, -2)[:, :, None]  # (b, hk, 1, d, n)
        values = self.values[:, :, None]  # (b, hk, 1, n, d)
        block = max(1, min(_CAUSAL_BLOCK, _SCORE_BLOCK_ELEMENTS // max(1, b * hq * n)))
        scores = self.slot("scores")
        outputs = []
        for i0 in range(0, q, block):
            i1 = min(q, i0 + block)
            k1 = n - q + i1  # causal: no query of this block sees a slot past its last query's own
            logits = torch.matmul(qg[:, :, :, i0:i1], keys_t[..., :k1])  # (b, hk, g, blk, k1)
            logits.masked_fill_(~mask[:, :, None, i0:i1, :k1], float("-inf"))
            probs = logits.softmax(dim=-1, dtype=torch.float32)
            self.scorer.accumulate(scores[..., :k1], probs, None if new_valid is None else new_valid[:, i0:i1])
            outputs.append(torch.matmul(probs.to(values.dtype), values[:, :, :, :k1]))  # (b, hk, g, blk, d)
        return torch.cat(outputs, dim=3).view(b, hq, q, d)

    # -- eviction ------------------------------------------------------------------------------------------------

    def make_room(self, q: int) -> None:
        """Before appending: a row whose append of ``c`` valid tokens would exceed ``capacity + max(slack, c)`` is
        cut back to capacity first, which bounds a chunked prefill's peak."""
        cap, slack = self.policy.capacity, self.policy.slack
        if cap is None or not self.is_initialized:
            return
        counts = self._new_counts(q)
        n_keep = [cap if v > cap and v + c > cap + max(slack, c) else v for v, c in zip(self.row_valid, counts)]
        if n_keep != self.row_valid:
            self._compact(n_keep)

    def _compact(self, n_keep: list[int]) -> None:
        """Keep, per row, the ``n_keep[row]`` best valid slots (per KV head); re-rotate keys when rolling.

        When only some rows are cut (a pool whose rows reach their budget at different steps), only those rows are
        gathered, and written back right-aligned so the other rows and the shared length stay as they are: a
        row's eviction costs one row's worth of work, not the whole pool's. Otherwise every row is gathered to
        the front and the length becomes ``max(n_keep)`` (a shorter row's extra slots become padding)."""
        self._set_working(True)
        cut = [r for r, (k, v) in enumerate(zip(n_keep, self.row_valid)) if k < v]
        if cut and len(cut) < len(n_keep):
            rows = torch.tensor(cut, device=self.device)
            kept = self._keep(
                {name: t[rows, :, : self.length] for name, t in self._slots.items()},
                self._valid_seen[rows],
                [n_keep[r] for r in cut],
                rotate=True,
            )
            start = self.length - kept["keys"].shape[2]
            for name, tensor in kept.items():
                self._slots[name][rows, :, start : self.length] = tensor
            self._slots["valid"][rows, :, :start] = False
            self.has_padding = True
        else:
            kept = self._keep(
                {name: t[:, :, : self.length] for name, t in self._slots.items()},
                self._valid_seen,
                n_keep,
                rotate=bool(cut),
            )
            target = max(n_keep)
            for name, tensor in kept.items():
                self._slots[name][:, :, :target] = tensor
            self.length = target
        self.row_evicted = [e + v - k for e, v, k in zip(self.row_evicted, self.row_valid, n_keep)]
        self.row_valid = list(n_keep)
        self._refresh_views()

    def _keep(
        self, slots: dict[str, torch.Tensor], valid_seen: torch.Tensor, n_keep: list[int], rotate: bool
    ) -> dict[str, torch.Tensor]:
        """The surviving slots of ``slots`` (per-slot tensors of some rows), gathered in order. Keys are
        re-rotated to their new rank when rolling and ``rotate`` (dropping padding alone changes no rank)."""
        valid = slots["valid"]
        scored = slots if self.direct else {**slots, "keys": slots[_WORK + "keys"]}  # keys as the model sees them
        score = self.scorer.rank(scored, valid_seen) if self.policy.needs_scores else None
        keep, keep_valid = select_kept(self.policy, valid, score, n_keep)
        kept = {name: _gather_slots(tensor, keep) for name, tensor in slots.items()}
        if keep_valid is not None:
            kept["valid"] &= keep_valid
            self.has_padding = True
        if self.rotary is not None and rotate:
            new_pos = kept["valid"].long().cumsum(-1) - 1
            if self.direct:
                old_pos = (valid.long().cumsum(-1) - 1).gather(2, keep)
                kept["keys"] = self.rotary.rotate(kept["keys"], new_pos - old_pos)
            else:  # from the codes, never from the working copy: no error accumulates
                kept[_WORK + "keys"] = self._current_keys(self._decoded("keys", kept), kept, new_pos)
        return kept

    def _new_counts(self, q: int) -> list[int]:
        """Valid tokens per row in the current forward (all ``q`` unless padding flags said otherwise)."""
        return self.new_counts or [q] * len(self.row_valid)

    def valid_counts(self) -> torch.Tensor:
        """``(batch,)`` valid slots per row (equal across KV heads)."""
        return torch.tensor(self.row_valid, device=self.device)

    def begin_forward(self, new_valid: torch.Tensor | None, new_counts: list[int], q: int) -> None:
        """Before a forward of ``q`` tokens with padding flags ``new_valid`` (``new_counts`` valid per row)."""
        self.new_valid, self.new_counts = new_valid, new_counts
        self.make_room(q)

    # -- rows of a pool ------------------------------------------------------------------------------------------

    def init_empty(self, batch: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        """Allocate ``batch`` empty rows (all slots padding), for a pool that sessions join and leave."""
        self.has_padding = True
        self._init_storage(batch, kv_heads, head_dim, head_dim, dtype, device, 0)
        self._slots["valid"].fill_(False)

    def _valid_index(self, row: int) -> torch.Tensor:
        """``(kv_heads, n)`` slot indices of ``row``'s valid tokens, in order."""
        valid = self.slot("valid")[row]
        return (
            valid.to(torch.int8).argsort(dim=-1, descending=True, stable=True)[:, : self.row_valid[row]].sort(-1).values
        )

    def insert_row(self, row: int, source: H2OLayer) -> None:
        """Copy the (single) row of ``source`` into ``row``, right-aligned; if it is longer than this layer's
        length, every row shifts right and gains padding in front."""
        if not source.is_initialized:
            self.clear_row(row)
            return
        n = source.row_valid[0]
        index = source._valid_index(0)
        if n > self.length:
            shift = n - self.length
            if n > self.n_slots:
                self._allocate(n)
            for tensor in self._slots.values():
                tensor[:, :, shift:n] = tensor[:, :, : self.length].clone()
            self._slots["valid"][:, :, :shift] = False
            self.length = n
        start = self.length - n
        self._slots["valid"][row, :, :start] = False
        for name, tensor in self._slots.items():
            if name in source._slots:
                tensor[row, :, start : self.length] = _gather_slots(source.slot(name)[0], index)
        self._valid_seen[row] = source._valid_seen[0]
        self.row_valid[row], self.row_evicted[row] = n, source.row_evicted[0]
        self.has_padding = True
        if self.working and not source.working:
            self._materialize([row])
        self._refresh_views()

    def extract_row(self, row: int) -> H2OLayer:
        """A batch-1 layer holding ``row``'s valid tokens (the row itself is left as it is)."""
        layer = H2OLayer(self.policy, self.rotary, self.scorer)
        index = self._valid_index(row)
        n = self.row_valid[row]
        layer._init_storage(1, self._kv_heads, self._dims["keys"], self._dims["values"], self.dtype, self.device, n)
        for name, tensor in layer._slots.items():
            tensor[0, :, :n] = _gather_slots(self.slot(name)[row], index)
        layer.length, layer.seen = n, int(self._valid_seen[row])  # the pool's count includes other rows' padding
        layer._valid_seen = self._valid_seen[row : row + 1].clone()
        layer.row_valid, layer.row_evicted = [n], [self.row_evicted[row]]
        layer._refresh_views()
        return layer

    def clear_row(self, row: int) -> None:
        """Free ``row``: all its slots become padding."""
        self._slots["valid"][row] = False
        self._valid_seen[row] = 0
        self.row_valid[row] = self.row_evicted[row] = 0

    # -- state ---------------------------------------------------------------------------------------------------

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """What it takes to continue this layer exactly elsewhere (a snapshot, another process): CPU copies of the
        stored per-slot tensors in use (not the working copy) and the counters, as JSON-able metadata."""
        meta: dict[str, Any] = {
            "length": self.length,
            "seen": self.seen,
            "row_valid": self.row_valid,
            "row_evicted": self.row_evicted,
            "has_padding": self.has_padding,
            "initialized": self.is_initialized,
        }
        if not self.is_initialized:
            return {}, meta
        meta.update(key_dim=self._dims["keys"], value_dim=self._dims["values"])
        tensors = {name: self.slot(name).to("cpu", copy=True) for name in self._fields}
        tensors["valid_seen"] = self._valid_seen.to("cpu", copy=True)
        return tensors, meta

    def load_state_dict(
        self, tensors: dict[str, torch.Tensor], meta: dict[str, Any], dtype: torch.dtype, device: torch.device
    ) -> None:
        """Continue from :meth:`state_dict` for a model computing in ``dtype`` on ``device`` (the layer's policy
        must be the one it was saved under)."""
        self.reset()
        if not meta["initialized"]:
            return
        keys = tensors["keys"]
        key_dim = meta.get("key_dim", keys.shape[-1])  # format 1 had no dims: the model's dtype, one key a row
        self._init_storage(
            keys.shape[0], keys.shape[1], key_dim, meta.get("value_dim", key_dim), dtype, device, meta["length"]
        )
        missing = set(self._fields) - set(tensors)
        if missing:
            raise ValueError(f"layer state lacks {sorted(missing)} for kv_dtype {self.policy.kv_dtype!r}")
        self.length = meta["length"]
        for name in self._fields:
            self._slots[name][:, :, : self.length] = tensors[name].to(device)
        self._valid_seen = tensors["valid_seen"].to(device, copy=True)
        self.seen, self.has_padding = meta["seen"], meta["has_padding"]
        self.row_valid, self.row_evicted = list(meta["row_valid"]), list(meta["row_evicted"])
        self._refresh_views()

    # -- transformers Cache contract -----------------------------------------------------------------------------

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """Keys attended to (kept + new) and the offset that makes a plain causal mask right over them."""
        return self.length + query_length, self.seen - self.length

    def get_max_length(self) -> int:
        return -1 if self.policy.max_tokens is None else self.policy.max_tokens

    def _apply_batch(self, fn) -> None:
        if self.is_initialized:
            self._slots = {name: fn(t) for name, t in self._slots.items()}
            self._valid_seen = fn(self._valid_seen)
            self._refresh_views()

    def _apply_rows(self, rows: list[int]) -> None:
        self.row_valid = [self.row_valid[r] for r in rows]
        self.row_evicted = [self.row_evicted[r] for r in rows]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._apply_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))
        self._apply_rows(beam_idx.tolist())

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._apply_batch(lambda t: t.repeat_interleave(repeats, dim=0))
        self._apply_rows([r for r in range(len(self.row_valid)) for _ in range(repeats)])

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._apply_batch(lambda t: t[indices])
        self._apply_rows(torch.arange(len(self.row_valid))[indices.cpu()].tolist())

    def reset(self) -> None:
        self._slots, self._fields = {}, {}
        self.keys = self.values = None
        self.working = False
        self.length = self.seen = 0
        self.has_padding = False
        self.row_valid, self.row_evicted, self.new_counts = [], [], []
        self.new_valid = self._valid_seen = None
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("an evicting cache cannot be rolled back (crop)")


class H2OCache(Cache):
    """A transformers ``Cache`` whose layers never hold more than ``capacity + slack`` tokens after a forward."""

    def __init__(
        self,
        policy: CachePolicy,
        num_layers: int,
        rotary: RotaryDelta | None = None,
        scorers: Sequence[Scorer] | None = None,
    ):
        """``scorers``: one per layer, ranking the heavy hitters instead of the rule ``policy.score_mode`` names."""
        if policy.rolling and policy.capacity is not None and rotary is None:
            raise ValueError("position rolling needs the model's rotary frequencies (pass `rotary`)")
        if scorers is not None and len(scorers) != num_layers:
            raise ValueError(f"{len(scorers)} scorers for {num_layers} layers; pass one per layer")
        rotary = rotary if policy.rolling else None
        scorers = scorers if scorers is not None else [scorer_for(policy)] * num_layers
        super().__init__(layers=[H2OLayer(policy, rotary, scorer) for scorer in scorers])
        self.policy = policy

    def kept_tokens(self) -> int:
        """Tokens held now by the fullest row (every layer holds the same counts)."""
        return max(self.layers[0].row_valid, default=0) if self.layers else 0

    @property
    def evicted_tokens(self) -> int:
        """Tokens evicted so far, summed over the rows (layer 0)."""
        return sum(self.layers[0].row_evicted) if self.layers else 0

    def nbytes(self) -> int:
        """Bytes the cache holds for its rows in every layer: stored keys and values (codes and scales), scores and
        bookkeeping, in whole pages; not the working copy (:meth:`working_nbytes`)."""
        return sum(layer.nbytes() for layer in self.layers)

    def working_nbytes(self) -> int:
        """Bytes of the decoded working copies (integer or other non-model-dtype storage, while in use)."""
        return sum(layer.working_nbytes() for layer in self.layers)

    def release_working(self) -> None:
        """Drop the working copies, e.g. when a session goes idle; the next forward rebuilds them."""
        for layer in self.layers:
            layer.release_working()

    @classmethod
    def pool(cls, model, policy: CachePolicy, batch: int, rotary: RotaryDelta | None = None) -> H2OCache:
        """An empty cache of ``batch`` rows that sessions join (:meth:`insert`) and leave (:meth:`extract`,
        :meth:`release`) between forwards; each row evicts exactly as it would alone."""
        text = model.config.get_text_config()
        cache = cls(policy, text.num_hidden_layers, rotary)
        kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        for layer in cache.layers:
            layer.init_empty(batch, kv_heads, head_dim, model.dtype, model.device)
        return cache

    def insert(self, row: int, session: H2OCache) -> None:
        """Move a batch-1 cache's tokens into ``row`` (its policy must be this pool's)."""
        if session.policy != self.policy:
            raise ValueError(f"policy {session.policy.name} does not match the pool's {self.policy.name}")
        for layer, source in zip(self.layers, session.layers):
            layer.insert_row(row, source)

    def extract(self, row: int) -> H2OCache:
        """A batch-1 cache with ``row``'s tokens, to continue alone or to snapshot."""
        single = H2OCache(self.policy, len(self.layers), self.layers[0].rotary)
        single.layers = [layer.extract_row(row) for layer in self.layers]
        return single

    def release(self, row: int) -> None:
        for layer in self.layers:
            layer.clear_row(row)

    def row_tokens(self, row: int) -> int:
        """Tokens held by ``row``."""
        return self.layers[0].row_valid[row]

    def begin_forward(self, new_valid: torch.Tensor | None, q: int) -> None:
        """Called before each forward of ``q`` tokens (``new_valid``: ``(batch, q)`` padding flags or None)."""
        counts: list[int] = []
        if new_valid is not None:
            counts = new_valid.sum(-1).tolist()  # one device sync per forward, not one per layer
            if all(c == q for c in counts):
                new_valid, counts = None, []
        for layer in self.layers:
            layer.begin_forward(new_valid, counts, q)

    def next_positions(self, new_valid: torch.Tensor | None, q: int, device: torch.device) -> torch.Tensor:
        """Positions ``(batch, q)`` for ``q`` new tokens, counted per row over valid tokens only (as `generate`
        numbers a left-padded batch): with rolling, among the kept tokens (so they never exceed capacity +
        slack); without, among all tokens seen (the original positions)."""
        layer = self.layers[0]
        if not layer.is_initialized:
            base = torch.zeros(1, dtype=torch.long, device=device)
        elif self.policy.rolling:
            base = layer.valid_counts().to(device)
        else:
            base = layer._valid_seen.to(device)
        if new_valid is None:
            return base[:, None] + torch.arange(q, device=device)
        return base[:, None] + (new_valid.long().cumsum(-1) - 1).clamp(min=0)
