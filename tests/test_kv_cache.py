"""The in-place KV cache (profiling/kv_cache.py) gives exactly what transformers' DynamicCache gives."""

from __future__ import annotations

import pytest
import torch
from speckv.profiling.kv_cache import GrowingLayer, growing_cache
from tiny import tiny_target
from transformers import DynamicCache


def _decode(model, cache, steps: int, crop_at: int | None) -> tuple[torch.Tensor, int]:
    """Left-padded prefill of 3 prompts, rows gathered to 4 (one prompt twice), greedy decode with an
    optional crop of 2 positions midway: the logits of every step and the final cached length."""
    ids = torch.randint(3, 100, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[0, :4] = 0
    out = model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
    rows = torch.tensor([0, 0, 1, 2])
    cache.reorder_cache(rows)
    mask = mask[rows]
    token = out.logits[rows, -1].argmax(-1)
    logits = []
    for step in range(steps):
        mask = torch.cat([mask, torch.ones(4, 1, dtype=torch.long)], 1)
        out = model(input_ids=token[:, None], attention_mask=mask, past_key_values=cache, use_cache=True)
        logits.append(out.logits[:, -1])
        token = out.logits[:, -1].argmax(-1)
        if step == crop_at:
            cache.crop(-2)
            mask = mask[:, :-2]
    return torch.stack(logits), cache.get_seq_length()


@pytest.mark.parametrize("reserve", [1, 4, 64])
@pytest.mark.parametrize("crop_at", [None, 3])
def test_growing_cache_decodes_exactly_like_dynamic_cache(reserve: int, crop_at: int | None) -> None:
    model = tiny_target().eval()
    with torch.no_grad():
        want, want_len = _decode(model, DynamicCache(config=model.config), 10, crop_at)
        cache = growing_cache(model.config, reserve)
        got, got_len = _decode(model, cache, 10, crop_at)
    assert all(isinstance(layer, GrowingLayer) for layer in cache.layers)
    assert got_len == want_len
    assert torch.equal(got, want)


def test_growing_layer_appends_in_place_until_full() -> None:
    layer = GrowingLayer(reserve=4)
    keys, values = layer.update(torch.ones(2, 1, 3, 8), torch.ones(2, 1, 3, 8))
    buffer = layer._key_buffer
    assert buffer.shape[-2] == 3 + 4 and keys.shape == (2, 1, 3, 8)
    for n in range(4):  # fits: same buffer, views grow
        keys, values = layer.update(torch.full((2, 1, 1, 8), n + 2.0), torch.zeros(2, 1, 1, 8))
        assert layer._key_buffer is buffer and keys.data_ptr() == buffer.data_ptr()
    assert keys.shape[-2] == 7 and keys[0, 0, -1, 0] == 5.0
    layer.update(torch.zeros(2, 1, 1, 8), torch.zeros(2, 1, 1, 8))  # full: one copy into a bigger buffer
    assert layer._key_buffer is not buffer and layer.get_seq_length() == 8
    assert torch.equal(layer.keys[:, :, :7], keys)
    layer.batch_select_indices(torch.tensor([1]))  # a fresh tensor: re-buffered on the next update
    layer.update(torch.zeros(1, 1, 1, 8), torch.zeros(1, 1, 1, 8))
    assert layer.keys.shape == (1, 1, 9, 8) and layer._key_buffer.shape[0] == 1
