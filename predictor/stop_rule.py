"""Tuning the MLP controller's stop rule: the (discount, start discount, trim) with the best replayed tokens/s
on dev traces, replaying the very controller the decode loop runs with the measured cost models."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from speckv.predictor.runtime import AcceptancePredictor, MLPController
from speckv.predictor.stats import pooled_rate
from speckv.profiling.controllers import Controller
from speckv.profiling.costmodel import CostModel, StepCosts
from speckv.profiling.replay import Trace, replay


def load_step_costs(calibrate_dir: str | Path, compressions: list[str]) -> dict[str, StepCosts]:
    """step_ms[k] for k = 0..gamma_max per compression (with draft_ms), from the measured cost models."""
    return {c: CostModel.load(Path(calibrate_dir) / f"{c}.json").step_costs() for c in compressions}


def replayed_goodput(
    controller_for: Callable[[str], Controller], traces: list[Trace], costs: dict[str, StepCosts]
) -> float:
    """Pooled modelled tokens/s of a policy replayed on traces; `controller_for(compression)` builds it
    (once per compression: replay resets a controller before each trace)."""
    controllers = {c: controller_for(c) for c in sorted({t.compression for t in traces})}
    results = [replay(controllers[t.compression], t, costs[t.compression]) for t in traces]
    return 1000.0 * pooled_rate(
        np.array([r.new_tokens for r in results]), np.array([r.model_ms for r in results])
    )


def mlp_for(predictor: AcceptancePredictor, gamma_max: int) -> Callable[[str], Controller]:
    """The deployed controller (MLPController) with the predictor's current stop rule, per compression."""
    return lambda compression: MLPController(predictor, gamma_max, compression, name="mlp")


def tune_stop_rule(
    predictor: AcceptancePredictor,
    traces: list[Trace],
    costs: dict[str, StepCosts],
    gamma_max: int,
    discount_grid: list[float],
    start_discount_grid: list[float | None],
    trim_options: list[bool],
) -> tuple[dict[str, Any], dict[str, float]]:
    """The (discount, start_discount, trim) with the best replayed tokens/s on `traces` (dev prompts).

    Tuned over all compressions together (the export's default) and for each compression alone (its
    `by_compression` entry, what MLPController uses): a quantized target's cheaper or dearer verify moves the
    best stopping point, as it moves the best fixed gamma. Ties go to the first in grid order. Sets the
    chosen rule on `predictor`; returns it and every candidate's score.
    """
    grid = [
        {"discount": d, "start_discount": s, "trim": t}
        for t in trim_options
        for s in start_discount_grid
        for d in discount_grid
    ]
    rule = predictor.stop_rule
    rule.pop("by_compression", None)

    def best_of(subset: list[Trace], label: str, scores: dict[str, float]) -> dict[str, Any]:
        best, best_score = grid[0], -1.0
        for knobs in grid:
            rule.update(knobs)
            score = replayed_goodput(mlp_for(predictor, gamma_max), subset, costs)
            start = "off" if knobs["start_discount"] is None else f"{knobs['start_discount']:g}"
            key = f"discount_{knobs['discount']:g}/start_{start}/trim_{int(knobs['trim'])}"
            scores[f"{label}/{key}"] = score
            if score > best_score:
                best, best_score = knobs, score
        return best

    scores: dict[str, float] = {}
    chosen = best_of(traces, "all", scores)
    by_compression = {
        c: best_of([t for t in traces if t.compression == c], c, scores)
        for c in sorted({t.compression for t in traces})
    }
    rule.update(chosen)
    rule["by_compression"] = by_compression
    return {**chosen, "by_compression": by_compression}, scores
