"""What produced a run: the git commit (and whether the tree was dirty), a params hash, the CPU, thread counts
and package versions, so that two reports from different checkouts or machines can be told apart.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

__all__ = ["collect", "git_state", "params_hash"]

PACKAGES = ("speckv", "torch", "transformers", "numpy", "pandas", "scikit-learn", "mlflow", "dvc")
# /proc/cpuinfo flags that decide which kernels torch can use (bf16: native bf16 matmuls).
SIMD_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile")
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def _git(root: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def git_state(root: str | Path) -> dict[str, Any]:
    """Commit checked out at `root` and the paths that differ from it (None each outside a git checkout)."""
    commit = _git(Path(root), "rev-parse", "HEAD")
    status = _git(Path(root), "status", "--porcelain")
    changed = [line[3:] for line in status.splitlines()] if status is not None else None
    return {
        "commit": commit.strip() if commit else None,
        "dirty": bool(changed) if changed is not None else None,
        "changed": changed,
    }


def params_hash(path: str | Path) -> str:
    """sha256 of the parsed params file in canonical JSON: comments and key order do not change it."""
    params = yaml.safe_load(Path(path).read_text()) or {}
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()


def cpu_flags(cpuinfo: str) -> list[str]:
    """The SIMD_FLAGS present in the first `flags` line of /proc/cpuinfo text."""
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            present = set(line.split(":", 1)[1].split())
            return [f for f in SIMD_FLAGS if f in present]
    return []


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def collect(root: str | Path, params_file: str | Path) -> dict[str, Any]:
    """Everything above for the checkout at `root` run with `params_file`, on this machine, now."""
    import torch
    from speckv.profiling.cpu import cpu_info

    try:
        flags = cpu_flags(Path("/proc/cpuinfo").read_text())
    except OSError:  # not Linux
        flags = []
    cpu = cpu_info()
    torch_threads = cpu.pop("torch_threads")  # reported with the other thread counts
    return {
        "git": git_state(root),
        "params_sha256": params_hash(params_file),
        "cpu": {**cpu, "flags": flags, "machine": platform.machine()},
        "threads": {
            "torch_intra_op": torch_threads,
            "torch_inter_op": torch.get_num_interop_threads(),
            "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            **{var: os.environ.get(var) for var in THREAD_VARS},
        },
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "versions": _versions(),
        "platform": platform.platform(),
    }
