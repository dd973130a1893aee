"""Fitting and scoring the acceptance predictor and its baselines, all on the same rows and metrics.

Labels may be soft (sampling: acceptance probabilities). scikit-learn's classifiers take hard labels, so a
soft label y becomes two weighted rows (1 with weight y, 0 with weight 1-y): the weighted log loss is
then exactly the soft-label cross-entropy the model should minimise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import brier_score_loss, log_loss, mean_absolute_error, r2_score, roc_auc_score
from sklearn.neural_network import MLPClassifier, MLPRegressor
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from speckv.predictor.features import FEATURES
from speckv.predictor.runtime import PROB_EPS, apply_calibration


@dataclass(frozen=True)
class MLPSpec:
    hidden_units: int  # the paper's predictor: one hidden layer of 16
    alpha: float  # L2 penalty
    max_iter: int  # L-BFGS iterations
    seed: int

    def estimator_args(self) -> dict:
        """scikit-learn's MLP settings: one relu hidden layer, full-batch L-BFGS (hence deterministic)."""
        return {
            "hidden_layer_sizes": (self.hidden_units,),
            "activation": "relu",
            "solver": "lbfgs",
            "alpha": self.alpha,
            "max_iter": self.max_iter,
            "random_state": self.seed,
        }


def as_weighted(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hard-label rows with sample weights equivalent to the (possibly soft) labels y."""
    if np.isin(y, (0.0, 1.0)).all():
        return X, y.astype(int), np.ones(len(y))
    return np.vstack([X, X]), np.r_[np.ones(len(y), int), np.zeros(len(y), int)], np.r_[y, 1.0 - y]


def fit_mlp(X: np.ndarray, y: np.ndarray, spec: MLPSpec) -> Pipeline:
    """Standardised inputs → 16 relu units → logistic output; L-BFGS is full-batch, hence deterministic."""
    model = make_pipeline(StandardScaler(), MLPClassifier(**spec.estimator_args()))
    Xw, yw, w = as_weighted(X, y)
    return model.fit(Xw, yw, mlpclassifier__sample_weight=w)


def fit_logistic(X: np.ndarray, y: np.ndarray, seed: int) -> Pipeline:
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, random_state=seed))
    Xw, yw, w = as_weighted(X, y)
    return model.fit(Xw, yw, logisticregression__sample_weight=w)


def feature_columns(names: tuple[str, ...]) -> list[int]:
    return [FEATURES.index(n) for n in names]


def positive_proba(model: Pipeline, X: np.ndarray) -> np.ndarray:
    return model.predict_proba(X)[:, 1]


def scores(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    """ROC AUC, log loss and Brier score; soft labels count as weighted positive and negative rows."""
    p = np.clip(p, PROB_EPS, 1 - PROB_EPS)
    _, yw, w = as_weighted(np.zeros((len(y), 1)), y)
    pw = p if len(yw) == len(p) else np.r_[p, p]
    return {
        "roc_auc": float(roc_auc_score(yw, pw, sample_weight=w)),
        "log_loss": float(log_loss(yw, pw, sample_weight=w, labels=[0, 1])),
        "brier": float(brier_score_loss(yw, pw, sample_weight=w)),
    }


def fit_calibration(p: np.ndarray, y: np.ndarray, kind: str) -> tuple[dict, dict[str, np.ndarray]]:
    """Platt or isotonic map fitted on (p, y); returns the export's JSON part and its arrays."""
    if kind == "none":
        return {"kind": "none"}, {}
    p = np.clip(p, PROB_EPS, 1 - PROB_EPS)
    if kind == "platt":
        logit = (np.log(p) - np.log1p(-p)).reshape(-1, 1)
        Xw, yw, w = as_weighted(logit, y)
        fit = LogisticRegression(C=1e6, max_iter=1000).fit(Xw, yw, sample_weight=w)
        return {"kind": "platt", "a": float(fit.coef_[0, 0]), "b": float(fit.intercept_[0])}, {}
    if kind == "isotonic":
        iso = IsotonicRegression(y_min=PROB_EPS, y_max=1 - PROB_EPS, out_of_bounds="clip").fit(p, y)
        return {"kind": "isotonic"}, {"iso_x": iso.X_thresholds_, "iso_y": iso.y_thresholds_}
    raise ValueError(f"unknown calibration {kind!r}")


def choose_calibration(
    p: np.ndarray, y: np.ndarray, prompt_fold: np.ndarray, kinds: tuple[str, ...]
) -> tuple[str, dict[str, float]]:
    """The calibration with the lowest dev log loss, cross-fitted over two prompt folds of dev.

    Scoring a map on the rows it was fitted on would always favour isotonic; the folds avoid that.
    """
    losses = {}
    for kind in kinds:
        out = np.empty_like(p)
        for fold in (0, 1):
            fit_rows, score_rows = prompt_fold != fold, prompt_fold == fold
            calibration, arrays = fit_calibration(p[fit_rows], y[fit_rows], kind)
            out[score_rows] = apply_calibration(p[score_rows], calibration, arrays)
        losses[kind] = scores(y, out)["log_loss"]
    return min(losses, key=lambda k: (losses[k], k != "none")), losses


def fit_step_regressor(X_steps: np.ndarray, rate: np.ndarray, spec: MLPSpec) -> Pipeline:
    """The published formulation: a step's acceptance rate from post-hoc aggregates of the whole draft."""
    return make_pipeline(StandardScaler(), MLPRegressor(**spec.estimator_args())).fit(X_steps, rate)


def step_scores(rate: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    return {
        "step_mae": float(mean_absolute_error(rate, predicted)),
        "step_r2": float(r2_score(rate, predicted)),
    }
