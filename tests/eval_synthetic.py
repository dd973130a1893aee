"""Synthetic dense traces (TRACE_SCHEMA) and cost models for the evaluation tests: no models needed.

Draft tokens agree with the target while a draft probability stays high, so confidence stops have
something to learn from, but not perfectly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from speckv.profiling.costmodel import CostModel
from speckv.profiling.schema import TRACE_SCHEMA

GAMMA_MAX = 6


def trace_rows(
    rng: np.random.Generator, prompt_id: str, task: str, split: str, compression: str, n_new: int
) -> list[dict]:
    rows = []
    for i in range(n_new):
        draft_prob = rng.beta(2.0, 1.2, GAMMA_MAX).astype(np.float32)
        hits = rng.random(GAMMA_MAX) < 1 / (1 + np.exp(-8 * (draft_prob - 0.5)))
        # the target's confidence before the step: where it is low, the first draft is rejected more often
        target_top1 = float(np.float32(rng.uniform(0.2, 1.0)))
        hits[0] &= rng.random() < target_top1**2
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
                "target_top1": target_top1,
                "target_entropy": float(np.float32(3.0 * (1 - target_top1))),
            }
        )
    return rows


def write_traces(
    path: Path,
    seed: int = 0,
    per_split: int = 6,
    compressions=("fp32", "int8"),
    splits=("dev", "test"),
    extra: tuple[tuple[str, str, str, int], ...] = (),
) -> Path:
    """Traces of `per_split` prompts per split and compression, plus one per (prompt_id, task, split, n_new)
    in `extra` (e.g. the prompts a test times live)."""
    rng = np.random.default_rng(seed)
    rows = []
    for compression in compressions:
        for prompt_id, task, split, n_new in extra:
            rows += trace_rows(rng, prompt_id, task, split, compression, n_new)
    for compression in compressions:
        for split in splits:
            for j in range(per_split):
                task = ("code", "chat")[j % 2]
                rows += trace_rows(
                    rng, f"{task}/{split}-{j}", task, split, compression, int(rng.integers(20, 40))
                )
    table = pa.Table.from_pylist(rows, schema=TRACE_SCHEMA)
    pq.write_to_dataset(table, path, partition_cols=["compression", "task"])
    return path


def cost_model(compression: str = "fp32", gamma_max: int = GAMMA_MAX) -> CostModel:
    steps = [40.0 + 7.0 * k for k in range(gamma_max + 1)]  # verify 40 + 2k ms, draft 5 ms per token
    slopes = [0.02 + 0.001 * k for k in range(gamma_max + 1)]  # dearer with context, as measured
    return CostModel(
        compression,
        "cpu",
        context_tokens=100.0,
        step_ms=steps,
        step_ms_per_token=slopes,
        draft_ms=5.0,
        prefill_ms=[5.0, 0.1],
        draft_prefill_ms=[2.0, 0.01],
    )


def write_costs(path: Path, compressions=("fp32", "int8"), gamma_max: int = GAMMA_MAX) -> Path:
    for c in compressions:
        cost_model(c, gamma_max).save(path / f"{c}.json")
    return path


def write_mlp_export(
    path: Path, compressions=("fp32", "int8"), gamma_max: int = GAMMA_MAX, seed: int = 0
) -> Path:
    """A small random MLP export whose output rises with draft_prob, so it behaves like a confidence stop,
    and a step-start model whose output rises with the target's confidence."""
    from speckv.predictor.export import build_meta, initial_stop_rule, write_export
    from speckv.predictor.features import FEATURES, START_FEATURES
    from speckv.predictor.runtime import START_PREFIX

    rng = np.random.default_rng(seed)
    weights = {}
    for prefix, names, key in (("", FEATURES, "draft_prob"), (START_PREFIX, START_FEATURES, "target_top1")):
        n, hidden = len(names), 4
        W1 = rng.normal(0, 0.05, (n, hidden))
        W1[names.index(key)] = 3.0
        layer = {
            "scaler_mean": np.full(n, 0.5),
            "scaler_scale": np.ones(n),
            "W1": W1,
            "b1": np.zeros(hidden),
            "W2": np.full((hidden, 1), 0.8),
            "b2": np.array([-1.0]),
        }
        weights.update({prefix + k: v for k, v in layer.items()})
    costs = {c: cost_model(c, gamma_max).step_costs() for c in compressions}
    stop_rule = {**initial_stop_rule(costs, gamma_max), "trim": True}
    return write_export(path, weights, build_meta({"kind": "none"}, stop_rule, "greedy", {}))


def replay_only_config(root: Path, per_split: int, compressions: tuple[str, ...], **settings):
    """Synthetic traces, cost models and an MLP export under `root`, and a replay-only, never-promoting
    evaluate config that reads them and writes to root/eval (`settings`: its other fields)."""
    from speckv.predictor.evaluation.evaluate import EvaluateConfig

    write_traces(root / "traces", per_split=per_split, compressions=compressions)
    write_costs(root / "calibrate", compressions=compressions)
    write_mlp_export(root / "export", compressions=compressions)
    dirs = {f"{name}_dir": str(root / name) for name in ("traces", "calibrate", "export")}
    return EvaluateConfig(
        **dirs, out_dir=str(root / "eval"), live_controllers={}, promote=False, overhead_calls=200, **settings
    )
