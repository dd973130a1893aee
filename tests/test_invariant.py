"""Row-wise attention: same results as SDPA, and a verify pass equal to one-token decoding row by row."""

from __future__ import annotations

import pytest
import torch
from speckv.profiling import invariant
from speckv.profiling.kv_cache import truncate
from speckv.profiling.models import load_pair
from tiny import tiny_target
from transformers import DynamicCache


def decode_then_verify(model, prompt: list[int], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of k greedy tokens decoded one at a time, and of the same k positions in one verify pass."""
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        model(torch.tensor([prompt[:-1]]), past_key_values=cache)
        start = cache.get_seq_length()
        seq, one_by_one = [prompt[-1]], []
        for _ in range(k):
            logits = model(torch.tensor([[seq[-1]]]), past_key_values=cache).logits[0, -1]
            one_by_one.append(logits)
            seq.append(int(logits.argmax()))
        truncate(cache, start)
        batched = model(torch.tensor([seq[:-1]]), past_key_values=cache).logits[0]
    return torch.stack(one_by_one), batched


def test_rowwise_attention_equals_sdpa_on_prefill_and_verify() -> None:
    model = tiny_target()
    ids = torch.tensor([list(range(3, 15))])
    with torch.inference_mode():
        ref = model(ids).logits
        ref_one, ref_verify = decode_then_verify(model, list(range(3, 30)), 6)
        invariant.install(model)
        assert model.config._attn_implementation == invariant.NAME
        got = model(ids).logits  # 12 rows: each its own causal prefix
        got_one, got_verify = decode_then_verify(model, list(range(3, 30)), 6)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_one, ref_one, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_verify, ref_verify, rtol=1e-4, atol=1e-4)


def count_sdpa_calls(model, ids: torch.Tensor) -> tuple[int, torch.Tensor]:
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention
    try:
        torch.nn.functional.scaled_dot_product_attention = lambda *a, **k: calls.append(1) or real(*a, **k)
        with torch.inference_mode():
            logits = model(ids).logits
    finally:
        torch.nn.functional.scaled_dot_product_attention = real
    return len(calls), logits


@pytest.mark.parametrize(("shape", "per_layer"), [((1, 5), 5), ((1, invariant.MAX_ROWS + 4), 1), ((2, 5), 1)])
def test_short_batch_one_passes_go_row_by_row_others_take_one_sdpa_call(shape, per_layer) -> None:
    model = tiny_target()
    ids = torch.randint(3, 60, shape)
    with torch.inference_mode():
        ref = model(ids).logits
    invariant.install(model)
    calls, got = count_sdpa_calls(model, ids)
    assert calls == per_layer * model.config.num_hidden_layers
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("compression", ["fp32", "int8", "nf4"])
def test_quantized_targets_get_rowwise_attention_and_verify_matches_decoding(
    tiny_pair_dir, compression
) -> None:
    target_dir, _ = tiny_pair_dir
    pair = load_pair(str(target_dir), None, compression, "cpu")
    expected = invariant.NAME if compression in ("int8", "nf4") else "sdpa"
    assert pair.target.config._attn_implementation == expected
    one_by_one, batched = decode_then_verify(pair.target, list(range(5, 40)), 8)
    torch.testing.assert_close(batched, one_by_one, rtol=1e-4, atol=1e-4)
