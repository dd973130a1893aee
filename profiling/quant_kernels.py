"""bitsandbytes' int8 and NF4 layers on CPUs without their native kernels: the same numbers, the weight kept.

On a CPU without AVX-512, bitsandbytes 0.50 computes LLM.int8's integer product as a float32 matmul of the
int8 weight converted to float32 *on every call* (`backends/default/ops.py`: `A.float() @ B.float().t()`),
and NF4 without AVX512-BF16 dequantizes the whole 4-bit weight to float32 on every call before `F.linear`.
The conversion, not the product, is most of a forward: on a 2-core AVX2 EPYC the int8 SmolLM2-135M target
took 222-266 ms per decoded token against 90 ms at fp32, the NF4 one 192 ms.

`CachedInt8Linear` and `CachedNF4Linear` replace such a layer's forward with the very calls bitsandbytes makes
(its row-wise int8 quantization of the input, the float32 matmul, its dequantization; the NF4 dequantization
and `F.linear`), but convert the weight once, at install. Outputs are bit-identical to the unpatched layer
(tests hold them so, for 1..40 rows); what changes is memory: one float32 copy of each weight (4x an int8
weight, 8x an NF4 one), so `install` runs under the same memory plan as the fp32 kernels
(`kernels.plan`), and the speed no longer shows the compressed format's memory traffic (on such CPUs
bitsandbytes has no compressed-weight kernel to show it).

Where bitsandbytes has its native CPU kernels (int8: `torch._int_mm` with AVX-512; NF4: the fused AVX512-BF16
kernel and its packed weight) nothing is patched. GPUs are never patched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from speckv.profiling import kernels

_ATTR = "_speckv_quant_kernel"
# |int8 x int8| <= 127 * 127 = 16129: a float32 sum of up to 1040 such products is an integer below 2**24, held
# exactly whatever the summation order; longer inner dimensions are summed chunk by chunk in int32
EXACT_CHUNK = (1 << 24) // (127 * 127)


def exact_int8_product(quantized: torch.Tensor, chunks: list[torch.Tensor]) -> torch.Tensor:
    """`quantized @ W.t()` in int32, exactly, from int8 rows and W's transposed float32 copy cut into
    `EXACT_CHUNK`-row chunks. bitsandbytes' fallback (one float32 matmul) gives the same integers whenever
    its own partial sums stay below 2**24, which real activations are far from (it would be inexact there)."""
    rows = quantized.float()
    out = None
    start = 0
    for chunk in chunks:
        part = (rows[:, start : start + chunk.shape[0]] @ chunk).to(torch.int32)
        out = part if out is None else out.add_(part)
        start += chunk.shape[0]
    return out


def _int8_uses_float_fallback() -> bool:
    """Whether bitsandbytes' CPU int8 matmul is its float32 fallback (False where unsure: left alone)."""
    try:
        from bitsandbytes.backends.cpu import ops
    except ImportError:
        return False
    return getattr(ops, "_has_avx512", True) is False


class CachedInt8Linear:
    """Forward of a bitsandbytes `Linear8bitLt` (threshold 0, inference) with its float32 weight kept."""

    def __init__(self, module) -> None:
        if module.weight.CB is not None:  # bitsandbytes moves CB/SCB into the state on the first forward
            module.init_8bit_state()
        state = module.state
        weight = state.CB if state.CB is not None else module.weight.data
        self.module = module
        self.scale = state.SCB if state.SCB is not None else module.weight.SCB
        # what `_int8_linear_matmul_impl` converts on every call, kept transposed (x @ Wt: a plain GEMV for
        # one row) and cut along the inner dimension into chunks whose sums stay exact in float32
        transposed = weight.float().t().contiguous()
        self.chunks = [transposed[i : i + EXACT_CHUNK] for i in range(0, transposed.shape[0], EXACT_CHUNK)]
        self.out_features = weight.shape[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        import bitsandbytes.functional as bnbf

        bias = self.module.bias
        if bias is not None and bias.dtype != x.dtype:  # as Linear8bitLt.forward casts it
            bias.data = bias.data.to(x.dtype)
        rows = x.reshape(-1, x.shape[-1])
        quantized, row_scale, _ = bnbf.int8_vectorwise_quant(rows.to(torch.float16), threshold=0.0)
        product = exact_int8_product(quantized, self.chunks)
        out = torch.ops.bitsandbytes.int8_mm_dequant.default(
            product, row_scale, self.scale, dtype=x.dtype, bias=bias
        )
        return out.reshape(*x.shape[:-1], self.out_features)


class CachedNF4Linear:
    """Forward of a bitsandbytes `Linear4bit` (not nested, unpacked) with its dequantized weight kept."""

    def __init__(self, module) -> None:
        state = module.weight.quant_state
        self.module = module
        self.dtype = module.compute_dtype or torch.float32
        self.weight = torch.ops.bitsandbytes.dequantize_4bit.default(
            module.weight.data.view(-1, 1),
            state.absmax,
            state.blocksize,
            state.quant_type,
            state.shape,
            self.dtype,
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.module.bias
        inp_dtype = x.dtype
        x = x.to(self.dtype)
        if bias is not None:
            if bias.dtype != x.dtype:
                bias.data = bias.data.to(x.dtype)
            bias = bias.to(self.dtype)
        return F.linear(x, self.weight, bias).to(inp_dtype)


def _kernel_class(module):
    """The cached kernel for `module`, or None where bitsandbytes' own path is kept."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return None
    if not isinstance(module, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)):
        return None
    if module.weight.device.type != "cpu" or module.training:
        return None
    if isinstance(module, bnb.nn.Linear8bitLt):
        plain = module.state.threshold == 0.0 and not module.state.has_fp16_weights
        return CachedInt8Linear if plain and _int8_uses_float_fallback() else None
    state = module.weight.quant_state
    native = getattr(module, "support_avx512bf16_for_cpu", False) or getattr(
        state, "packing_format_for_cpu", False
    )
    plain = (
        state is not None and not state.nested and (module.compute_dtype or torch.float32) == torch.float32
    )
    return CachedNF4Linear if plain and not native else None


def eligible(module: torch.nn.Module) -> bool:
    return _kernel_class(module) is not None


def copy_bytes(models: list) -> int:
    """Bytes of the float32 weights `install` would keep for `models`."""
    total = 0
    for model in models:
        if model is None:
            continue
        for module in model.modules():
            if eligible(module) and not hasattr(module, _ATTR):
                out_features, in_features = module.out_features, module.in_features
                total += 4 * out_features * in_features
    return total


@torch.inference_mode()
def install(model: torch.nn.Module) -> int:
    """Patch every eligible quantized layer of an inference model; returns the number patched."""

    def make(module):
        cls = _kernel_class(module)
        return None if cls is None else cls(module)

    return kernels.patch_forward(model, _ATTR, make)


def uninstall(model: torch.nn.Module) -> int:
    """Undo `install`; returns the number of layers restored."""
    return kernels.unpatch_forward(model, _ATTR)
