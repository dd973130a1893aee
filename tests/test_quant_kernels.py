"""bitsandbytes layers with their float32 weight kept: the same outputs as bitsandbytes' own CPU fallback."""

from __future__ import annotations

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import pytest
import torch
import torch.nn.functional as F
from speckv.profiling import quant_kernels
from speckv.profiling.models import load_pair


@pytest.mark.parametrize("inner", [64, quant_kernels.EXACT_CHUNK, quant_kernels.EXACT_CHUNK + 1, 3000])
def test_int8_product_is_exact_even_where_one_float32_sum_is_not(inner: int) -> None:
    torch.manual_seed(inner)
    a = torch.randint(-127, 128, (5, inner), dtype=torch.int8)
    w = torch.randint(-127, 128, (7, inner), dtype=torch.int8)
    a[0], w[0] = 127, 127  # the largest sum there is: 16129 * inner, past 2**24 for 3000
    t = w.float().t().contiguous()
    chunks = [t[i : i + quant_kernels.EXACT_CHUNK] for i in range(0, inner, quant_kernels.EXACT_CHUNK)]
    got = quant_kernels.exact_int8_product(a, chunks)
    assert got.dtype == torch.int32
    assert torch.equal(got, (a.long() @ w.long().t()).to(torch.int32))


def _layers(model, cls):
    return [m for m in model.modules() if isinstance(m, cls)]


def test_int8_layers_match_bitsandbytes_bit_for_bit(tiny_pair_dir, monkeypatch) -> None:
    monkeypatch.setattr(quant_kernels, "_int8_uses_float_fallback", lambda: True)
    target_dir, _ = tiny_pair_dir
    model = load_pair(str(target_dir), None, "int8", "cpu", cpu_kernels=False).target
    layers = _layers(model, bnb.nn.Linear8bitLt)
    assert layers and all(quant_kernels.eligible(m) for m in layers)
    torch.manual_seed(0)
    with torch.inference_mode():
        for rows in (1, 5, 40):
            for layer in layers[:3]:
                x = torch.randn(1, rows, layer.in_features) * 3
                ref = layer(x)  # bitsandbytes' own forward (its int8 product is exact too: equal anywhere)
                got = quant_kernels.CachedInt8Linear(layer)(x)
                assert got.dtype == ref.dtype and torch.equal(got, ref)
        ids = torch.randint(3, 60, (2, 23))
        ref = model(ids).logits
        fresh = load_pair(str(target_dir), None, "int8", "cpu", cpu_kernels=False).target
        assert quant_kernels.install(fresh) == len(layers)  # before its first forward
        assert quant_kernels.install(fresh) == 0  # idempotent
        assert torch.equal(fresh(ids).logits, ref)
        assert quant_kernels.uninstall(fresh) == len(layers)
        assert torch.equal(fresh(ids).logits, ref)


def test_nf4_layers_match_bitsandbytes_fallback_bit_for_bit(tiny_pair_dir) -> None:
    target_dir, _ = tiny_pair_dir
    model = load_pair(str(target_dir), None, "nf4", "cpu", cpu_kernels=False).target
    layers = _layers(model, bnb.nn.Linear4bit)
    assert layers
    torch.manual_seed(0)
    with torch.inference_mode():
        for layer in layers[:3]:
            kernel = quant_kernels.CachedNF4Linear(layer)  # before any forward can repack the weight
            state = layer.weight.quant_state
            weight = bnbf.dequantize_4bit(layer.weight.data, state).to(torch.float32)
            for rows in (1, 5, 40):
                x = torch.randn(1, rows, layer.in_features)
                assert torch.equal(kernel(x), F.linear(x, weight, layer.bias))  # bitsandbytes' CPU fallback
                if quant_kernels.eligible(layer):  # no native kernel here: that fallback is the layer itself
                    assert torch.equal(kernel(x), layer(x))


def test_only_quantized_cpu_layers_in_inference_are_eligible(tiny_pair_dir) -> None:
    assert not quant_kernels.eligible(torch.nn.Linear(8, 8))
    target_dir, _ = tiny_pair_dir
    pair = load_pair(str(target_dir), None, "fp32", "cpu")
    assert quant_kernels.copy_bytes([pair.target, None]) == 0
    layer = bnb.nn.Linear8bitLt(16, 8, has_fp16_weights=False, threshold=6.0)
    assert not quant_kernels.eligible(layer)  # outlier decomposition: bitsandbytes' path is kept
