"""A KV cache for a batch whose rows hold different numbers of positions, and the forward that feeds it.

In batched speculative decoding every row accepts its own prefix, so rows advance by different lengths each
step. `RowCache` keeps row b's positions at slots 0 .. lengths[b]-1 of one [batch, heads, capacity, dim]
buffer per layer: a forward writes each row's new positions right after that row's own (slot = position),
and rolling a row back is lowering its length, with no copy and no hole. Slots past a row's length hold stale
keys that the attention mask hides, so each row attends to exactly its own sequence at its own positions,
as batch-1 decoding of that row does (up to the float rounding of the batched kernels).

The other layouts cost more here: left padding with right-aligned rows moves a row's whole cache whenever it
accepts fewer tokens than the others; masking rejected positions in place leaves holes that every later
attention reads, and that row-wise attention (profiling/invariant.py) would have to gather around.
"""

from __future__ import annotations

from typing import Any

import torch
from speckv.profiling.errors import SpeckvError
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

__all__ = ["RowCache", "row_forward"]


class RowLayer(DynamicLayer):
    """One layer of a `RowCache`: writes each row's new keys and values at the slots its owner names."""

    def __init__(self, owner: RowCache, reserve: int) -> None:
        super().__init__()
        self.owner = owner
        self.reserve = max(1, reserve)

    def _grow(self, like: torch.Tensor, end: int) -> None:
        """Room for `end` slots (and some ahead), keeping what is held; `like` gives batch, heads and dim."""
        capacity = end + max(self.reserve, end // 2)
        batch, heads, _, dim = like.shape
        keys = like.new_zeros((batch, heads, capacity, dim))
        values = like.new_zeros((batch, heads, capacity, dim))
        if self.is_initialized:
            held = self.buffers[0].shape[-2]
            keys[:, :, :held].copy_(self.buffers[0])
            values[:, :, :held].copy_(self.buffers[1])
        self.buffers = keys, values
        self.keys, self.values = keys[:, :, :0], values[:, :, :0]
        self.device = like.device
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self._grow(key_states, self.owner.end)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        slots, end = self.owner.slots, self.owner.end
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        elif self.buffers[0].shape[-2] < end:
            self._grow(key_states, end)
        keys, values = self.buffers
        rows = torch.arange(slots.shape[0], device=slots.device)[:, None]
        # advanced indices around a slice put their dims first: [batch, new positions, heads, dim]
        keys[rows, :, slots] = key_states.transpose(1, 2)
        values[rows, :, slots] = value_states.transpose(1, 2)
        self.keys, self.values = keys[:, :, :end], values[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return max(self.owner.lengths, default=0)

    def keep_rows(self, rows: torch.Tensor) -> None:
        if self.is_initialized:
            self.buffers = tuple(b.index_select(0, rows) for b in self.buffers)
            self.keys, self.values = (b[:, :, : self.keys.shape[-2]] for b in self.buffers)


class RowCache(DynamicCache):
    """A `DynamicCache` of `batch` rows, each holding `lengths[row]` positions (see the module docstring).

    `row_forward` sets `slots` (where the fed tokens go, [batch, fed]) and `end` (the key length attention
    reads) before each forward and advances `lengths` after it; lowering `lengths[row]` rolls that row back.
    """

    def __init__(self, config: Any, batch: int, reserve: int = 64) -> None:
        super().__init__(config=config)
        if any(type(layer) is not DynamicLayer for layer in self.layers):
            raise SpeckvError(
                "batched decoding needs full-attention layers (no sliding window or linear attention)"
            )
        self.layers = [RowLayer(self, reserve) for _ in self.layers]
        self.lengths = [0] * batch
        self.slots = torch.zeros(batch, 0, dtype=torch.long)
        self.end = 0

    @classmethod
    def stack(cls, caches: list[Cache], config: Any, reserve: int = 64) -> RowCache:
        """One row per batch-1 cache of `caches` (rows may hold different lengths, or nothing)."""
        out = cls(config, len(caches), reserve)
        out.lengths = [c.get_seq_length() for c in caches]
        full = next((c for c in caches if c.get_seq_length()), None)
        if full is None:
            return out
        out.end = max(out.lengths)
        for i, layer in enumerate(out.layers):
            like = full.layers[i].keys
            layer._grow(like.expand(len(caches), -1, -1, -1), out.end)
            keys, values = layer.buffers
            for row, (cache, n) in enumerate(zip(caches, out.lengths, strict=True)):
                if n:
                    keys[row, :, :n].copy_(cache.layers[i].keys[0])
                    values[row, :, :n].copy_(cache.layers[i].values[0])
            layer.keys, layer.values = keys[:, :, : out.end], values[:, :, : out.end]
        return out

    def keep_rows(self, rows: list[int]) -> None:
        """Keep only `rows` (in that order): finished rows leave the batch."""
        index = torch.tensor(rows, dtype=torch.long, device=self.slots.device)
        for layer in self.layers:
            layer.keep_rows(index.to(layer.buffers[0].device) if layer.is_initialized else index)
        self.lengths = [self.lengths[r] for r in rows]


def row_forward(model, cache: RowCache, feeds: list[list[int]], all_logits: bool) -> torch.Tensor:
    """Feed row b's tokens `feeds[b]` after its own cached positions (a row may feed none); logits of every fed
    slot [batch, fed, V] with `all_logits`, else of each row's last fed token [batch, V] (a row that fed
    nothing gets a meaningless row). Shorter feeds are right padded; padding writes past the row's length,
    where the next forward overwrites it, and its outputs are never read."""
    device = model.device
    width = max(len(f) for f in feeds)
    input_ids = torch.tensor([f + [0] * (width - len(f)) for f in feeds], dtype=torch.long, device=device)
    starts = torch.tensor(cache.lengths, dtype=torch.long, device=device)
    positions = starts[:, None] + torch.arange(width, device=device)
    cache.slots = positions
    cache.end = max(cache.lengths) + width
    # query at position p of a row sees that row's slots 0..p: its own sequence, nothing stale
    mask = torch.arange(cache.end, device=device)[None, None, :] <= positions[:, :, None]
    last = torch.tensor([[max(len(f) - 1, 0)] for f in feeds], dtype=torch.long, device=device)
    out = model(
        input_ids=input_ids,
        attention_mask=mask[:, None],
        position_ids=positions,
        cache=cache,
        use_cache=True,
        logits_to_keep=0 if all_logits else last,
    )
    cache.lengths = [n + len(f) for n, f in zip(cache.lengths, feeds, strict=True)]
    return out.logits if all_logits else out.logits[:, 0]
