"""Few-row CPU kernels: same products as F.linear, reversible, and only where they apply."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from speckv.profiling import kernels


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9, 16, 17, 40])
def test_kernel_matches_f_linear(rows: int, bias: bool) -> None:
    torch.manual_seed(rows)
    layer = torch.nn.Linear(192, 320, bias=bias)
    kernel = kernels.FewRowLinear(layer)
    x = torch.randn(1, rows, 192)
    with torch.inference_mode():
        got, ref = kernel(x), F.linear(x, layer.weight, layer.bias)
    assert got.shape == ref.shape == (1, rows, 320)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    flat = torch.randn(rows, 192)
    torch.testing.assert_close(kernel(flat), F.linear(flat, layer.weight, layer.bias), rtol=1e-4, atol=1e-4)


def test_non_contiguous_input_and_gradients_fall_back_correctly() -> None:
    layer = torch.nn.Linear(64, 128)
    kernel = kernels.FewRowLinear(layer)
    x = torch.randn(3, 64, 2)[..., 0]  # strided rows
    torch.testing.assert_close(kernel(x), F.linear(x, layer.weight, layer.bias), rtol=1e-4, atol=1e-4)
    xg = torch.randn(2, 64, requires_grad=True)
    kernel(xg).sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()


def test_install_patches_only_fp32_plain_linear_and_uninstall_restores() -> None:
    class Quantized(torch.nn.Linear):  # stands in for bitsandbytes' Linear8bitLt / Linear4bit
        pass

    model = torch.nn.Sequential(
        torch.nn.Linear(64, 64), Quantized(64, 64), torch.nn.Linear(64, 64).half(), torch.nn.ReLU()
    )
    x = torch.randn(2, 64)
    with torch.inference_mode():
        before = model[:2](x)
        assert kernels.install(model) == 1
        assert kernels.install(model) == 0  # idempotent
        assert "forward" in model[0].__dict__ and "forward" not in model[1].__dict__
        torch.testing.assert_close(model[:2](x), before, rtol=1e-4, atol=1e-4)
    assert kernels.uninstall(model) == 1
    assert "forward" not in model[0].__dict__


@pytest.mark.parametrize("rows", [1, 2, 5, 16, 17])
def test_lean_kernel_keeps_one_copy_and_the_same_products(rows: int) -> None:
    torch.manual_seed(rows)
    layer = torch.nn.Linear(96, 160, bias=True)
    kernel = kernels.FewRowLinear(layer, lean=True)
    assert kernel.weight_t is None
    x = torch.randn(rows, 96)
    with torch.inference_mode():
        torch.testing.assert_close(kernel(x), F.linear(x, layer.weight, layer.bias), rtol=1e-4, atol=1e-4)


def test_plan_drops_copies_that_would_not_fit() -> None:
    """The models' bytes plus two copies of their fp32 linear weights must fit in MEMORY_SHARE of memory,
    else one copy, else none; tied weights count once."""
    embed = torch.nn.Embedding(100, 50)
    head = torch.nn.Linear(50, 100, bias=False)
    head.weight = embed.weight  # tied, as Qwen's head
    model = torch.nn.Sequential(embed, torch.nn.Linear(50, 50, bias=False), head)
    mode, held, copy = kernels.plan([model, None], mem_total=10**9)
    assert (held, copy) == (4 * (100 * 50 + 50 * 50), 4 * (100 * 50 + 50 * 50))
    share = kernels.MEMORY_SHARE
    assert kernels.plan([model], mem_total=int((held + 2 * copy) / share) + 1)[0] == "full"
    assert kernels.plan([model], mem_total=int((held + 2 * copy) / share) - 8)[0] == "lean"
    assert kernels.plan([model], mem_total=int((held + copy) / share) - 8)[0] == "off"
