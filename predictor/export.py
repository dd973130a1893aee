"""Writing the trained predictor as a safe export: `weights.npz` (numpy arrays, no pickle) + `model.json`.

model.json holds the feature lists (token model and step-start model), the calibration, the stop rule
(discount, start_discount, trim, gamma_max, per-compression step_ms and draft_ms from the cost models) and the
training config; predictor.runtime loads it with numpy alone.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.pipeline import Pipeline
from speckv.predictor.features import COMPRESSIONS, FEATURES, START_FEATURES
from speckv.predictor.runtime import (
    EXPORT_FORMAT,
    META_FILE,
    START_PREFIX,
    WEIGHTS_FILE,
    AcceptancePredictor,
    start_predictor,
)


def mlp_weights(model: Pipeline) -> dict[str, np.ndarray]:
    """The scaler and both dense layers of a fitted StandardScaler → MLPClassifier pipeline."""
    scaler, mlp = model[0], model[-1]
    return {
        "scaler_mean": scaler.mean_,
        "scaler_scale": scaler.scale_,
        "W1": mlp.coefs_[0],
        "b1": mlp.intercepts_[0],
        "W2": mlp.coefs_[1],
        "b2": mlp.intercepts_[1],
    }


def build_meta(
    calibration: dict[str, Any], stop_rule: dict[str, Any], label_mode: str, train_config: dict[str, Any]
) -> dict[str, Any]:
    return {
        "format": EXPORT_FORMAT,
        "features": list(FEATURES),
        "start": {"features": list(START_FEATURES), "calibration": {"kind": "none"}},
        "compressions": list(COMPRESSIONS),
        "activation": "relu",
        "output": "logistic",
        "calibration": calibration,
        "stop_rule": stop_rule,
        "label_mode": label_mode,
        "train_config": train_config,
    }


def initial_stop_rule(step_costs: dict[str, Any], gamma_max: int) -> dict[str, Any]:
    """The stop rule's cost tables per compression (StepCosts: step_ms + draft_ms) and neutral knobs
    (discount 1, start discount 1, no trim) until dev replay tunes them."""
    return {
        "gamma_max": gamma_max,
        "discount": 1.0,
        "start_discount": 1.0,
        "trim": False,
        "step_ms": {c: list(cost) for c, cost in step_costs.items()},
        "draft_ms": {c: cost.draft_ms for c, cost in step_costs.items()},
    }


def build_predictor(
    model: Pipeline,
    calibration: dict[str, Any],
    arrays: dict[str, np.ndarray],
    meta: dict[str, Any],
    start_model: Pipeline,
) -> tuple[AcceptancePredictor, dict[str, np.ndarray]]:
    """The runtime predictor (with its step-start model) exactly as it will be exported, so training scores
    what is deployed."""
    start = {f"{START_PREFIX}{k}": v for k, v in mlp_weights(start_model).items()}
    weights = {k: np.asarray(v, np.float64) for k, v in {**mlp_weights(model), **arrays, **start}.items()}
    predictor = AcceptancePredictor(weights, {**meta, "calibration": calibration})
    predictor.start = start_predictor(predictor, weights)
    return predictor, weights


def write_export(path: str | Path, weights: dict[str, np.ndarray], meta: dict[str, Any]) -> Path:
    """Write the export directory atomically: built beside `path`, then swapped in."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        np.savez(staging / WEIGHTS_FILE, **{k: np.asarray(v, np.float64) for k, v in weights.items()})
        (staging / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
            staging.rename(path)
            shutil.rmtree(old)
        else:
            staging.rename(path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path
