"""Fitting the acceptance models: the token MLP and the step-start model (each with its L2 penalty chosen by
dev log loss), the logistic baselines, and the dev folds calibration is cross-fitted on."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from speckv.predictor import model
from speckv.predictor.dataset import Split
from speckv.predictor.features import FEATURES, table_start_features


def fit_by_dev_loss(
    X_train: np.ndarray, y_train: np.ndarray, X_dev: np.ndarray, y_dev: np.ndarray, specs: list[model.MLPSpec]
) -> dict[float, tuple[float, Any, model.MLPSpec]]:
    """{alpha: (dev log loss, fitted MLP, its spec)} for each candidate spec; pick with `best_alpha`."""
    fits = {}
    for spec in specs:
        candidate = model.fit_mlp(X_train, y_train, spec)
        loss = model.scores(y_dev, model.positive_proba(candidate, X_dev))["log_loss"]
        fits[spec.alpha] = (loss, candidate, spec)
    return fits


def best_alpha(fits: dict[float, tuple]) -> float:
    """The penalty with the lowest dev log loss (small tables overfit); ties go to the first candidate."""
    return min(fits, key=lambda a: fits[a][0])


def fit_baselines(splits: dict[str, Split], seed: int) -> dict[str, Any]:
    """Logistic regression on all features, and on draft probability or entropy alone."""
    train = splits["train"]
    out: dict[str, Any] = {
        "logistic": (model.fit_logistic(train.X, train.y, seed), list(range(len(FEATURES))))
    }
    for name in ("draft_prob", "entropy"):
        cols = model.feature_columns((name,))
        out[f"{name}_only"] = (model.fit_logistic(train.X[:, cols], train.y, seed), cols)
    return out


def fit_start_model(
    start_rows: pd.DataFrame, specs: list[model.MLPSpec], seed: int
) -> tuple[Any, dict[str, Any], dict[str, np.ndarray]]:
    """The step-start model: P(first drafted token accepted) from what is known before drafting.

    The token MLP's candidate specs, the one with the best dev log loss kept. Returns the model, its metrics
    and test predictions.
    """
    X = {s: table_start_features(start_rows[start_rows["split"] == s]) for s in ("train", "dev", "test")}
    y = {s: start_rows.loc[start_rows["split"] == s, "first_accepted"].to_numpy(np.float64) for s in X}
    fits = fit_by_dev_loss(X["train"], y["train"], X["dev"], y["dev"], specs)
    alpha = best_alpha(fits)
    fitted = fits[alpha][1]
    top1_only = model.fit_logistic(X["train"][:, :1], y["train"], seed)
    predictions = {
        "start_mlp": model.positive_proba(fitted, X["test"]),
        "target_top1_only": model.positive_proba(top1_only, X["test"][:, :1]),
        "train_rate": np.full(len(y["test"]), y["train"].mean()),
    }
    metrics = {
        "alpha": alpha,
        "rows": {s: len(v) for s, v in y.items()},
        "first_accept_rate": {s: float(v.mean()) for s, v in y.items()},
        "test": {name: model.scores(y["test"], p) for name, p in predictions.items()},
    }
    return fitted, metrics, {"X": X["test"], "y": y["test"]}


def prompt_folds(rows: pd.DataFrame) -> np.ndarray:
    """0/1 per row, alternating over sorted prompts: a deterministic two-way split of dev by prompt."""
    prompts = sorted(set(zip(rows["task"], rows["prompt_id"], strict=True)))
    fold = {p: i % 2 for i, p in enumerate(prompts)}
    return np.array([fold[p] for p in zip(rows["task"], rows["prompt_id"], strict=True)])
