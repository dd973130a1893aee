"""What this CPU can do, detected rather than assumed: the bf16 choice and the facts a report records.

bfloat16 pays only with native instructions (AVX512-BF16 or AMX): on an AVX2-only AMD EPYC the bf16 teacher
generated 25-38 tokens/s against 108 in float32, while on an AVX512-BF16 Intel CPU bf16 was ~1.8x float32.
"""

from __future__ import annotations

import platform
from pathlib import Path

import torch

__all__ = ["cpu_info", "native_bf16", "resolve_auto_dtype"]


def native_bf16() -> bool:
    """True when the CPU runs bfloat16 matmuls natively (AVX512-BF16 or AMX tiles)."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve_auto_dtype(name: str) -> str:
    """`auto` -> "bfloat16" where the CPU has native bf16, else "float32"; any other name passes through."""
    if name != "auto":
        return name
    return "bfloat16" if native_bf16() else "float32"


def _model_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_info() -> dict:
    """Model name, torch's SIMD capability, native bf16, core and thread counts."""
    import os

    return {
        "model": _model_name(),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "avx512_bf16": bool(torch.cpu._is_avx512_bf16_supported()),
        "amx": bool(torch.cpu._is_amx_tile_supported()),
        "native_bf16": native_bf16(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
