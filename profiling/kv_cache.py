"""The KV-cached forward and rollback the engine shares (`forward`, `truncate`), and a KV cache that appends
in place: transformers' `DynamicCache` with layers that grow a buffer, not a copy.

`DynamicLayer.update` concatenates: every decoded token copies the whole cache of every layer. At batch 1
that is cheap; batched (teacher generation, traced target continuations, tails drafted together) it is most
of a decode step. Measured on a 2-core AVX2 CPU (SmolLM2-135M, float32, batch 48, 384 cached positions):
`torch.cat` of one layer's keys took 2.7 ms alone and 7.3 ms inside the model (64% of the step's CPU time),
against 0.01 ms to write the new position into a reserved buffer. Attention reads a view of the buffer
(`buffer[:, :, :length]`), which scaled_dot_product_attention takes as is (4.0 ms against 5.8 ms on a
contiguous copy there).

`GrowingLayer` keeps `keys`/`values` as such views and reserves room ahead (`reserve` positions, then half
again what it holds); anything that replaces them with fresh tensors (`reorder_cache`, `batch_select_indices`,
`batch_repeat_interleave`) is picked up on the next update by one copy into a new buffer, and `crop` keeps
the buffer (the next update overwrites the cropped positions). Values and shapes are the ones `DynamicLayer`
gives, so outputs are identical.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

__all__ = ["GrowingLayer", "forward", "growing_cache", "stack_left_padded", "truncate"]


def forward(model, ids: list[int], cache: DynamicCache, device: torch.device, all_logits: bool):
    """Feed `ids` after what `cache` holds; logits of the last position (or of every position)."""
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    out = model(
        input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=0 if all_logits else 1
    )
    return out.logits[0] if all_logits else out.logits[0, -1]


def truncate(cache: DynamicCache, length: int) -> None:
    """Drop cached positions beyond `length` (DynamicCache.crop takes a negative count in transformers 5)."""
    excess = cache.get_seq_length() - length
    if excess > 0:
        cache.crop(-excess)


class GrowingLayer(DynamicLayer):
    """A `DynamicLayer` whose keys and values are views of buffers with room to append."""

    def __init__(self, reserve: int = 128) -> None:
        super().__init__()
        self.reserve = max(1, reserve)
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None

    def _owns(self, tensor: torch.Tensor, buffer: torch.Tensor | None) -> bool:
        """Whether `tensor` is still the leading view of `buffer` (not replaced by a base-class method)."""
        return (
            buffer is not None
            and tensor.data_ptr() == buffer.data_ptr()
            and tensor.shape[:2] == buffer.shape[:2]
            and tensor.shape[-1] == buffer.shape[-1]
            and tensor.stride() == buffer.stride()
        )

    def _regrow(self, current: torch.Tensor, new: torch.Tensor, capacity: int) -> torch.Tensor:
        held = current.shape[-2] if current.numel() else 0
        batch, heads, _, dim = new.shape
        buffer = new.new_empty((batch, heads, capacity, dim))
        if held:
            buffer[:, :, :held].copy_(current)
        return buffer

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        held = self.get_seq_length()
        end = held + key_states.shape[-2]
        fits = (
            self._owns(self.keys, self._key_buffer)
            and self._owns(self.values, self._value_buffer)
            and self._key_buffer.shape[:2] == key_states.shape[:2]
            and end <= self._key_buffer.shape[-2]
        )
        if not fits:
            capacity = end + max(self.reserve, end // 2)
            self._key_buffer = self._regrow(self.keys, key_states, capacity)
            self._value_buffer = self._regrow(self.values, value_states, capacity)
        self._key_buffer[:, :, held:end].copy_(key_states)
        self._value_buffer[:, :, held:end].copy_(value_states)
        self.keys = self._key_buffer[:, :, :end]
        self.values = self._value_buffer[:, :, :end]
        return self.keys, self.values

    def reset(self) -> None:
        super().reset()
        self._key_buffer = self._value_buffer = None


def growing_cache(config: Any, reserve: int = 128) -> Cache:
    """An empty `DynamicCache` for a model with `config` whose plain layers are `GrowingLayer`s with `reserve`
    positions of room ahead (sliding-window and other special layers stay transformers' own)."""
    cache = DynamicCache(config=config)
    cache.layers = [GrowingLayer(reserve) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def stack_left_padded(caches: list[Cache], config: Any, reserve: int) -> tuple[Cache, list[int]]:
    """One cache of all rows of `caches` (any batch sizes and lengths, rows in order), each left padded with
    zero keys and values to the longest, with `reserve` positions of room ahead; the pad width of every row.
    Padded positions must be masked by the caller (they hold no real token)."""
    lengths = [c.get_seq_length() for c in caches]
    width = max(lengths)
    stacked = growing_cache(config, reserve)
    for layer in range(len(stacked.layers)):
        keys, values = [], []
        for cache, n in zip(caches, lengths, strict=True):
            pad = (0, 0, width - n, 0)  # the sequence dim (second to last), on the left
            keys.append(torch.nn.functional.pad(cache.layers[layer].keys, pad))
            values.append(torch.nn.functional.pad(cache.layers[layer].values, pad))
        stacked.update(torch.cat(keys), torch.cat(values), layer)
    pads = [
        width - n
        for cache, n in zip(caches, lengths, strict=True)
        for _ in range(cache.layers[0].keys.shape[0])
    ]
    return stacked, pads
