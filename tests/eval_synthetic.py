"""Synthetic dense traces (TRACE_SCHEMA) and cost models for the evaluation tests: no models needed.

Draft tokens agree with the target while a draft probability stays high, so confidence stops have
something to learn from, but not perfectly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from profiling.costmodel import CostModel
from profiling.schema import TRACE_SCHEMA

GAMMA_MAX = 6


def trace_rows(
    rng: np.random.Generator, prompt_id: str, task: str, split: str, compression: str, n_new: int
) -> list[dict]:
    rows = []
    for i in range(n_new):
        draft_prob = rng.beta(2.0, 1.2, GAMMA_MAX).astype(np.float32)
        hits = rng.random(GAMMA_MAX) < 1 / (1 + np.exp(-8 * (draft_prob - 0.5)))
        match = int(np.argmin(hits)) if not hits.all() else GAMMA_MAX
        match = min(match, n_new - i)
        rows.append(
            {
                "prompt_id": prompt_id,
                "task": task,
                "split": split,
                "compression": compression,
                "new_index": i,
                "position": 30 + i,
                "target_token": 5,
                "draft_tokens": [5] * GAMMA_MAX,
                "match_len": match,
                "n_new": n_new,
                "draft_prob": draft_prob.tolist(),
                "top1_prob": draft_prob.tolist(),
                "margin": (draft_prob / 2).tolist(),
                "entropy": (2.5 * (1 - draft_prob)).tolist(),
            }
        )
    return rows


def write_traces(path: Path, seed: int = 0, per_split: int = 6, compressions=("fp32", "int8")) -> Path:
    rng = np.random.default_rng(seed)
    rows = []
    for compression in compressions:
        for split in ("dev", "test"):
            for j in range(per_split):
                task = ("code", "chat")[j % 2]
                rows += trace_rows(
                    rng, f"{task}/{split}-{j}", task, split, compression, int(rng.integers(20, 40))
                )
    table = pa.Table.from_pylist(rows, schema=TRACE_SCHEMA)
    pq.write_to_dataset(table, path, partition_cols=["compression", "task"])
    return path


def cost_model(compression: str = "fp32", gamma_max: int = GAMMA_MAX) -> CostModel:
    verify = [40.0 + 2.0 * k for k in range(gamma_max + 1)]
    return CostModel(compression, "cpu", draft_ms=5.0, verify_ms=verify)


def write_costs(path: Path, compressions=("fp32", "int8"), gamma_max: int = GAMMA_MAX) -> Path:
    for c in compressions:
        cost_model(c, gamma_max).save(path / f"{c}.json")
    return path


def write_mlp_export(
    path: Path, compressions=("fp32", "int8"), gamma_max: int = GAMMA_MAX, seed: int = 0
) -> Path:
    """A small random MLP export whose output rises with draft_prob, so it behaves like a confidence stop."""
    from predictor.export import build_meta, write_export
    from predictor.features import FEATURES

    rng = np.random.default_rng(seed)
    n, hidden = len(FEATURES), 4
    W1 = rng.normal(0, 0.05, (n, hidden))
    W1[FEATURES.index("draft_prob")] = 3.0
    weights = {
        "scaler_mean": np.full(n, 0.5),
        "scaler_scale": np.ones(n),
        "W1": W1,
        "b1": np.zeros(hidden),
        "W2": np.full((hidden, 1), 0.8),
        "b2": np.array([-1.0]),
    }
    steps = {c: [cost_model(c, gamma_max).step_ms(k) for k in range(gamma_max + 1)] for c in compressions}
    meta = build_meta(
        {"kind": "none"}, {"gamma_max": gamma_max, "discount": 1.0, "step_ms": steps}, "greedy", {}
    )
    return write_export(path, weights, meta)
