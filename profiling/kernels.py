"""Few-row fp32 linear layers on CPU: the kernels a decode loop needs, not the ones a GEMM library picks.

Decoding multiplies one row by every weight; verifying a draft multiplies 2..gamma_max+1 rows. On the
2-core AVX-512 machine this project runs on, torch's default `F.linear` (MKL sgemm on the transposed
weight) is slow for exactly those shapes (SmolLM2-135M, 2 threads, whole-model forward with a 200-token
cache, ms): 1 token 67, 2 tokens 114, 3 tokens 146, 9 tokens 117 -- a 2-token verify cost 1.7x a 1-token
forward although both are bound by reading the same weights once. Routed through

* one row: `x @ Wt` on a contiguous transposed copy of the weight (a plain GEMV),
* two or more rows: oneDNN's linear on a weight packed once (`torch._C._nn.mkldnn_linear`),

the same forwards took 52, 60, 69 and 96 ms (interleaved medians, same run). Both kernels compute the
same products as `F.linear` in another summation order (max logit difference ~1e-4 on the real model),
so greedy outputs may differ from an unpatched model's only at near-ties; target-alone and speculative
runs in one process always share the patched model, so losslessness is checked like for like.

Costs and limits: two extra copies of every patched weight in memory (inference only: the copies are
taken once and go stale if the weights change afterwards), fp32 `nn.Linear` on CPU only -- half-precision
weights (torch's fp16 CPU GEMV is fast as is, `x @ Wt` is not), bitsandbytes' int8/NF4 layers and GPU
models are left alone. `install` returns how many layers it patched; `uninstall` restores them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_ATTR = "_speckv_kernel"
SKINNY_ROWS = 4  # up to this many rows: W @ x^T (a tall-skinny GEMM); more: oneDNN (measured crossover 4-5)
MAX_ROWS = 16  # beyond: F.linear (prefill, batched generation: big GEMMs where MKL is at home)


class FewRowLinear:
    """Callable that replaces one `nn.Linear.forward`, choosing the kernel by the number of input rows."""

    def __init__(self, module: torch.nn.Linear) -> None:
        weight = module.weight.detach()
        self.weight = weight
        self.bias = None if module.bias is None else module.bias.detach()
        self.out_features = weight.shape[0]
        self.weight_t = weight.t().contiguous()
        self.packed = None
        if torch.backends.mkldnn.is_available():
            self.packed = weight.to_mkldnn()
            bias = self.bias if self.bias is not None else torch.zeros(self.out_features, dtype=weight.dtype)
            self.packed_bias = bias.to_mkldnn()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.weight.dtype or (torch.is_grad_enabled() and x.requires_grad):
            return F.linear(x, self.weight, self.bias)
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        x2 = x.reshape(rows, x.shape[-1])
        if rows == 1:
            y = x2 @ self.weight_t if self.bias is None else torch.addmm(self.bias, x2, self.weight_t)
        elif 1 < rows <= SKINNY_ROWS:
            y = (
                self.weight @ x2.t()
                if self.bias is None
                else torch.addmm(self.bias[:, None], self.weight, x2.t())
            ).t()
        elif 1 < rows <= MAX_ROWS and self.packed is not None:
            y = torch._C._nn.mkldnn_linear(
                x2.contiguous().to_mkldnn(), self.packed, self.packed_bias
            ).to_dense()
        else:
            y = F.linear(x2, self.weight, self.bias)
        return y.reshape(*x.shape[:-1], self.out_features)


def eligible(module: torch.nn.Module) -> bool:
    """Plain fp32 `nn.Linear` on CPU (subclasses such as bitsandbytes' quantized layers are not)."""
    return (
        type(module) is torch.nn.Linear
        and module.weight.dtype == torch.float32
        and module.weight.device.type == "cpu"
    )


def install(model: torch.nn.Module) -> int:
    """Patch every eligible linear layer of an inference model; returns the number patched."""
    count = 0
    for module in model.modules():
        if eligible(module) and not hasattr(module, _ATTR):
            kernel = FewRowLinear(module)
            module.forward = kernel
            setattr(module, _ATTR, kernel)
            count += 1
    return count


def uninstall(model: torch.nn.Module) -> int:
    """Undo `install`; returns the number of layers restored."""
    count = 0
    for module in model.modules():
        if hasattr(module, _ATTR):
            del module.forward
            delattr(module, _ATTR)
            count += 1
    return count
