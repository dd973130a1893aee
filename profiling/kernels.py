"""Few-row fp32 linear layers on CPU: the kernels a decode loop needs, not the ones a GEMM library picks.

Decoding multiplies one row by every weight; verifying a draft multiplies 2..gamma_max+1 rows. On the
2-core AVX-512 machine this project runs on, torch's default `F.linear` (MKL sgemm on the transposed
weight) is slow for exactly those shapes, worst on SmolLM2's 49152x576 head (ms, 2 threads: 1 row 10.5,
2 rows 24.5, 3 rows 34.5, against 4.1 for 2 rows as `W @ x^T` and 8.4 for 9 rows in oneDNN). Routed as

* one row: `x @ Wt` on a contiguous transposed copy of the weight (a plain GEMV),
* 2..SKINNY_ROWS rows: `W @ x^T` (a tall-skinny GEMM),
* up to MAX_ROWS rows: oneDNN's linear on a weight packed once (`torch._C._nn.mkldnn_linear`),
* more rows (prefill, batched generation): `F.linear`, unchanged,

the whole-model forward of SmolLM2-135M after a cached prompt took (benchmarks/bench_kernels.py, medians of
5 interleaved rounds, ms, off -> on): 1 token 79.6 -> 63.5, 2 tokens 135.3 -> 74.3, 3 tokens 172.1 -> 94.0,
9 tokens 136.2 -> 117.5; greedy decoding 1.16x faster, and `fixed:1` went from 0.76x to 0.98x of `none`.
The kernels compute the same products as `F.linear` in another summation order (max logit difference
1.2e-4), so greedy outputs may differ from an unpatched model's only at near-ties; target-alone and
speculative runs in one process always share the patched model, so losslessness is checked like for like.

Costs and limits: two extra copies of every patched weight in memory (inference only: the copies are
taken once and go stale if the weights change afterwards), one where two would not fit (`plan`: "lean";
1..MAX_ROWS rows then all go to the packed weight: on Qwen2.5-1.5B's target, lean, `W @ x^T` made a 2-token
forward cost 391-404 ms against 205-226 for 1 token and 333-344 for 5 on the packed weight; all packed,
1/2/5 tokens took 241/280/323 ms). Only fp32 `nn.Linear` on CPU is patched: half-precision weights (torch's
fp16 CPU GEMV is fast as is, `x @ Wt` is not), bitsandbytes' int8/NF4 layers and GPU models are left alone.
`install` returns how many layers it patched; `uninstall` restores them.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

_ATTR = "_speckv_kernel"
SKINNY_ROWS = 4  # up to this many rows: W @ x^T (a tall-skinny GEMM); more: oneDNN (measured crossover 4-5)
MAX_ROWS = 16  # beyond: F.linear (prefill, batched generation: big GEMMs where MKL is at home)


class FewRowLinear:
    """Callable that replaces one `nn.Linear.forward`, choosing the kernel by the number of input rows."""

    def __init__(self, module: torch.nn.Linear, lean: bool = False) -> None:
        weight = module.weight.detach()
        self.weight = weight
        self.bias = None if module.bias is None else module.bias.detach()
        self.out_features = weight.shape[0]
        # lean: no transposed copy (one row goes to the packed weight), one extra copy of the weight, not two
        self.weight_t = None if lean else weight.t().contiguous()
        self.packed = None
        if torch.backends.mkldnn.is_available():
            self.packed = weight.to_mkldnn()
            bias = self.bias if self.bias is not None else torch.zeros(self.out_features, dtype=weight.dtype)
            self.packed_bias = bias.to_mkldnn()
        # most rows that go to `W @ x^T`: none when lean with a packed weight (every few-row call goes there)
        self.skinny_rows = 0 if self.weight_t is None and self.packed is not None else SKINNY_ROWS

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.weight.dtype or (torch.is_grad_enabled() and x.requires_grad):
            return F.linear(x, self.weight, self.bias)
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        x2 = x.reshape(rows, x.shape[-1])
        if rows == 1 and self.weight_t is not None:
            y = x2 @ self.weight_t if self.bias is None else torch.addmm(self.bias, x2, self.weight_t)
        elif 1 <= rows <= self.skinny_rows:
            y = (
                self.weight @ x2.t()
                if self.bias is None
                else torch.addmm(self.bias[:, None], self.weight, x2.t())
            ).t()
        elif 1 <= rows <= MAX_ROWS and self.packed is not None:
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


MEMORY_SHARE = 0.8  # the models plus the kernels' copies may use this share of the machine's memory


def _unique_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def plan(models: list[torch.nn.Module], mem_total: int | None = None, extra: int = 0) -> tuple[str, int, int]:
    """("full" | "lean" | "off", bytes the models hold, bytes one copy of their eligible weights takes).

    `extra`: bytes other kernels will keep beside them (quant_kernels' float32 weights), counted as held.

    full: two extra copies of each eligible weight (transposed + packed); lean: the packed one only, where
    two do not fit in MEMORY_SHARE of `mem_total` (default: MemTotal of /proc/meminfo; unknown: full);
    off: not even one fits. A fp32 1.5B target with a fp32 0.5B draft (8 GB) needs 24.6 GB with two copies:
    on a 24 GB machine that thrashed the page cache (84 GB read from disk in one evaluation)."""
    models = [m for m in models if m is not None]
    held = _unique_bytes(p for m in models for p in m.parameters()) + extra
    copy = _unique_bytes(m.weight for model in models for m in model.modules() if eligible(m))
    if mem_total is None:
        mem_total = _mem_total()
    if mem_total is None:
        return "full", held, copy
    budget = MEMORY_SHARE * mem_total
    mode = "full" if held + 2 * copy <= budget else "lean" if held + copy <= budget else "off"
    return mode, held, copy


def _mem_total() -> int | None:
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:  # not Linux
        return None
    for line in text.splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return None


def patch_forward(model: torch.nn.Module, attr: str, make) -> int:
    """Replace `forward` of every module of `model` for which `make(module)` returns a kernel (a callable), marking
    it with `attr`; modules already marked are skipped. Returns the number patched."""
    count = 0
    for module in model.modules():
        if hasattr(module, attr):
            continue
        kernel = make(module)
        if kernel is not None:
            module.forward = kernel
            setattr(module, attr, kernel)
            count += 1
    return count


def unpatch_forward(model: torch.nn.Module, attr: str) -> int:
    """Undo `patch_forward` for the modules marked with `attr`; returns the number restored."""
    count = 0
    for module in model.modules():
        if hasattr(module, attr):
            del module.forward
            delattr(module, attr)
            count += 1
    return count


def install(model: torch.nn.Module, lean: bool = False) -> int:
    """Patch every eligible linear layer of an inference model; returns the number patched. `lean` keeps one
    extra copy of each weight instead of two (see `plan`)."""
    return patch_forward(model, _ATTR, lambda m: FewRowLinear(m, lean) if eligible(m) else None)


def uninstall(model: torch.nn.Module) -> int:
    """Undo `install`; returns the number of layers restored."""
    return unpatch_forward(model, _ATTR)
