"""The training stage as one library call: data → models → calibration → stop rule → scores → export.

Everything tunable is fitted on train prompts or tuned on dev prompts; test prompts are only scored.
Test metrics, replayed goodput and importances are computed with the runtime predictor built from the
export, so they describe exactly what the decode loop will run.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from predictor import importance, model, policy
from predictor.dataset import Split, build_splits, load_tokens, select_runs, split_drafts
from predictor.export import build_meta, build_predictor, write_export
from predictor.features import COMPRESSIONS, FEATURES, RUNNING, STEP_KEYS
from profiling.atomic import atomic_path, write_text
from profiling.costmodel import CostModel
from profiling.errors import SpeckvError

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    tokens_dir: str = "artifacts/profile/tokens"  # profiled token table, hive-partitioned
    calibrate_dir: str = "artifacts/calibrate"  # cost models, one {compression}.json per compression
    out_dir: str = "artifacts/predictor"  # metrics.json, plots, importance.json
    export_dir: str = "artifacts/predictor/export"  # the deployed model (numpy-loadable)
    mode: str = "greedy"  # which profiled runs to learn from: greedy (0/1 labels) or sampling (soft)
    controller: str = "fixed:8"  # the full-draft profiling runs: every position up to a rejection labelled
    seed: int = 0
    hidden_units: int = 16
    alpha_grid: list[float] = field(
        default_factory=lambda: [1e-4, 1e-2, 0.1, 1.0, 3.0]
    )  # L2 penalties; dev picks
    max_iter: int = 500  # L-BFGS iterations
    calibrations: list[str] = field(default_factory=lambda: ["none", "platt", "isotonic"])
    discount_grid: list[float] = field(default_factory=lambda: [round(0.5 + 0.05 * i, 2) for i in range(15)])
    importance_scoring: str = "neg_log_loss"  # or roc_auc (greedy labels only are meaningful for AUC)
    importance_repeats: int = 5
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    artifact_location: str = "mlartifacts"  # where a new MLflow experiment stores artifacts
    experiment: str = "speckv-train"
    register: bool = True  # register the export as speckv-gamma-predictor@candidate

    def __post_init__(self) -> None:
        # Checked here so a typo fails before minutes of training, not after.
        problems = []
        if self.mode not in ("greedy", "sampling"):
            problems.append(f"mode must be greedy or sampling, got {self.mode!r}")
        if not set(self.calibrations) <= {"none", "platt", "isotonic"} or not self.calibrations:
            problems.append("calibrations must be a non-empty subset of none, platt, isotonic")
        if self.importance_scoring not in importance.SCORINGS:
            problems.append(f"importance_scoring must be one of {importance.SCORINGS}")
        if not self.discount_grid or min(self.discount_grid) <= 0:
            problems.append("discount_grid must hold positive numbers")
        if not self.alpha_grid or min(self.alpha_grid) < 0:
            problems.append("alpha_grid must hold non-negative numbers")
        if self.hidden_units < 1 or self.max_iter < 1 or self.importance_repeats < 1:
            problems.append("hidden_units, max_iter and importance_repeats must be >= 1")
        if problems:
            raise SpeckvError("[train] " + "; ".join(problems))


def _atomic_figure(fig: plt.Figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def load_step_costs(calibrate_dir: str | Path, compressions: list[str]) -> dict[str, list[float]]:
    """step_ms[k] for k = 0..gamma_max per compression, from the measured cost models."""
    costs = {}
    for c in compressions:
        cost = CostModel.load(Path(calibrate_dir) / f"{c}.json")
        costs[c] = [cost.step_ms(k) for k in range(cost.gamma_max + 1)]
    return costs


def replay_steps(rows: pd.DataFrame, p: np.ndarray) -> tuple[list[np.ndarray], np.ndarray, list[str]]:
    """Per step: predicted acceptances in draft order, the full draft's accepted count, compression."""
    frame = rows[[*STEP_KEYS, "draft_index", "accepted", "labelled"]].assign(p=p)
    frame = frame.sort_values([*STEP_KEYS, "draft_index"], kind="stable")
    step_id = frame.groupby(list(STEP_KEYS), sort=False, observed=True).ngroup().to_numpy()
    starts = np.r_[0, np.flatnonzero(np.diff(step_id)) + 1]
    drafts = np.split(frame["p"].to_numpy(), starts[1:])
    hits = (frame["accepted"] & frame["labelled"]).to_numpy(int)
    compressions = frame["compression"].astype(str).to_numpy()[starts].tolist()
    return drafts, np.add.reduceat(hits, starts), compressions


def paper_step_table(X: np.ndarray, rows: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, pd.Series]:
    """The published features: each step's aggregates over its whole draft + gamma + compression.

    Post-hoc by construction (they need the draft that gamma produced), kept only as a reference.
    Returns step features, step acceptance rate, and each row's step number to broadcast predictions.
    """
    frame = rows[[*STEP_KEYS, "draft_index", "gamma", "accepted", "labelled"]].reset_index(drop=True)
    step_id = frame.groupby(list(STEP_KEYS), sort=False, observed=True).ngroup()
    last = (
        frame.assign(step_id=step_id)
        .sort_values("draft_index")
        .groupby("step_id")
        .tail(1)
        .sort_values("step_id")
    )
    cols = [FEATURES.index(c) for c in RUNNING] + [FEATURES.index(f"compression={c}") for c in COMPRESSIONS]
    X_steps = np.column_stack([X[last.index.to_numpy()][:, cols], last["gamma"].to_numpy(np.float64)])
    hits = (frame["accepted"] & frame["labelled"]).groupby(step_id).sum().to_numpy()
    return X_steps, hits / last["gamma"].to_numpy(np.float64), step_id


def prompt_folds(rows: pd.DataFrame) -> np.ndarray:
    """0/1 per row, alternating over sorted prompts: a deterministic two-way split of dev by prompt."""
    prompts = sorted(set(zip(rows["task"], rows["prompt_id"], strict=True)))
    fold = {p: i % 2 for i, p in enumerate(prompts)}
    return np.array([fold[p] for p in zip(rows["task"], rows["prompt_id"], strict=True)])


def reliability_figure(y: np.ndarray, predictions: dict[str, np.ndarray], bins: int = 10) -> plt.Figure:
    """Mean label per bin of predicted probability (uniform bins), one line per model."""
    fig, ax = plt.subplots(figsize=(6, 6))
    ax.plot([0, 1], [0, 1], ls="--", color="grey", label="perfect")
    edges = np.linspace(0, 1, bins + 1)
    for name, p in predictions.items():
        which = np.clip(np.digitize(p, edges) - 1, 0, bins - 1)
        filled = [b for b in range(bins) if (which == b).any()]
        ax.plot(
            [p[which == b].mean() for b in filled],
            [y[which == b].mean() for b in filled],
            marker="o",
            label=name,
        )
    ax.set_xlabel("predicted acceptance")
    ax.set_ylabel("observed acceptance (test prompts)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


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


def run_training(config: TrainConfig) -> dict[str, Any]:
    """Train, tune, score, explain and export; returns the metrics written to metrics.json."""
    out_dir = Path(config.out_dir)
    tokens = select_runs(load_tokens(config.tokens_dir), config.mode, config.controller)
    splits = build_splits(tokens)
    log.info("rows: %s", {k: len(s.y) for k, s in splits.items()})

    # Step 1: the MLP (its L2 penalty chosen by dev log loss: small tables overfit) and the baselines.
    fits = {}
    for alpha in config.alpha_grid:
        spec = model.MLPSpec(config.hidden_units, alpha, config.max_iter, config.seed)
        candidate = model.fit_mlp(splits["train"].X, splits["train"].y, spec)
        loss = model.scores(splits["dev"].y, model.positive_proba(candidate, splits["dev"].X))["log_loss"]
        fits[alpha] = (loss, candidate, spec)
    alpha = min(fits, key=lambda a: fits[a][0])
    _, mlp, spec = fits[alpha]
    log.info("MLP alpha %g (dev log loss %s)", alpha, {f"{a:g}": round(f[0], 4) for a, f in fits.items()})
    baselines = fit_baselines(splits, config.seed)

    # Step 2: calibration, only if it lowers cross-fitted dev log loss.
    dev = splits["dev"]
    p_dev = model.positive_proba(mlp, dev.X)
    kind, dev_losses = model.choose_calibration(
        p_dev, dev.y, prompt_folds(dev.rows), tuple(config.calibrations)
    )
    calibration, arrays = model.fit_calibration(p_dev, dev.y, kind)
    log.info("calibration %s (cross-fitted dev log loss %s)", kind, dev_losses)

    # Step 3: the stop rule's discount, tuned by replay on dev prompts with the measured cost models.
    compressions = sorted(tokens["compression"].astype(str).unique())
    step_costs = load_step_costs(config.calibrate_dir, compressions)
    gamma_max = min(int(tokens["draft_index"].max()) + 1, *(len(c) - 1 for c in step_costs.values()))
    step_costs = {c: cost[: gamma_max + 1] for c, cost in step_costs.items()}
    # Before anything is drafted there are no draft signals: the controller's draft-or-not decision at step
    # start uses the first drafted token's acceptance rate on train prompts as its prior.
    train_rows = tokens[(tokens["split"] == "train") & (tokens["draft_index"] == 0)]
    first_accept = {
        c: float(train_rows.loc[train_rows["compression"].astype(str) == c, "accepted"].mean())
        for c in compressions
    }
    meta = build_meta(
        calibration,
        {"gamma_max": gamma_max, "discount": 1.0, "step_ms": step_costs, "first_accept": first_accept},
        config.mode,
        asdict(config),
    )
    predictor, weights = build_predictor(mlp, calibration, arrays, meta)
    X_dev, dev_rows = split_drafts(tokens, "dev")
    drafts, first_rejection, step_comp = replay_steps(dev_rows, predictor.predict_proba(X_dev))
    costs = [step_costs[c] for c in step_comp]
    discount, dev_goodput = policy.tune_discount(drafts, first_rejection, costs, config.discount_grid)
    predictor.stop_rule["discount"] = discount
    log.info("stop rule discount %.2f (dev replayed goodput %.1f tok/s)", discount, dev_goodput[discount])

    # Step 4: scores on test prompts — the deployed predictor, the raw MLP and every baseline.
    test = splits["test"]
    predictions = {"mlp": predictor.predict_proba(test.X), "mlp_uncalibrated": predictor.predict_raw(test.X)}
    for name, (fitted, cols) in baselines.items():
        predictions[name] = model.positive_proba(fitted, test.X[:, cols])
    metrics: dict[str, Any] = {"models": {name: model.scores(test.y, p) for name, p in predictions.items()}}
    metrics["models"]["paper_step_regression"] = paper_reference(tokens, spec, test)
    X_test, test_rows = split_drafts(tokens, "test")
    drafts, first_rejection, step_comp = replay_steps(test_rows, predictor.predict_proba(X_test))
    costs = [step_costs[c] for c in step_comp]
    metrics["replay_test_tokens_per_s"] = {
        "mlp_stop_rule": policy.replay_goodput(drafts, first_rejection, costs, discount),
        **{f"fixed:{g}": policy.fixed_goodput(first_rejection, costs, g) for g in range(1, gamma_max + 1)},
    }
    metrics["calibration"] = {"chosen": kind, "dev_log_loss": dev_losses}
    metrics["alpha"] = {"chosen": alpha, "dev_log_loss": {f"{a:g}": f[0] for a, f in fits.items()}}
    metrics["stop_rule"] = {
        "discount": discount,
        "gamma_max": gamma_max,
        "dev_tokens_per_s": {f"{d:g}": v for d, v in dev_goodput.items()},
    }
    metrics["rows"] = {k: len(s.y) for k, s in splits.items()}

    # Step 5: permutation importance of the deployed predictor on test prompts.
    args = (predictor, test.X, test.y, config.importance_scoring, config.importance_repeats, config.seed)
    features, groups = importance.feature_importance(*args), importance.group_importance(*args)
    comparison = importance.paper_comparison(features, groups)
    importances = {
        "scoring": config.importance_scoring,
        "features": features,
        "groups": groups,
        "paper": comparison,
    }

    # Step 6: write everything, each file atomically, then the export directory.
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2))
    write_text(out_dir / "importance.json", json.dumps(importances, indent=2))
    write_text(out_dir / "importance.md", importance.comparison_markdown(comparison))
    _atomic_figure(
        reliability_figure(test.y, {k: v for k, v in predictions.items() if k != "mlp_uncalibrated"}),
        out_dir / "reliability.png",
    )
    _atomic_figure(
        importance.importance_figure(features, groups, config.importance_scoring), out_dir / "importance.png"
    )
    write_export(config.export_dir, weights, predictor.meta)
    return metrics


def paper_reference(tokens: pd.DataFrame, spec: model.MLPSpec, test: Split) -> dict[str, float]:
    """Fit the published step-rate regression on train prompts; score it on test tokens and steps."""
    X_train, train_rows = split_drafts(tokens, "train")
    X_steps, rate, _ = paper_step_table(X_train, train_rows)
    fitted = model.fit_step_regressor(X_steps, rate, spec)
    X_test, test_rows = split_drafts(tokens, "test")
    X_steps, rate, step_id = paper_step_table(X_test, test_rows)
    predicted = np.clip(fitted.predict(X_steps), 0.0, 1.0)
    # Every labelled test token gets its step's predicted rate, so it is scored on the same rows.
    key = test_rows[list(STEP_KEYS)].assign(rate=predicted[step_id.to_numpy()])
    token_rate = test.rows[list(STEP_KEYS)].merge(
        key.drop_duplicates(list(STEP_KEYS)), how="left", on=list(STEP_KEYS)
    )
    return {**model.scores(test.y, token_rate["rate"].to_numpy()), **model.step_scores(rate, predicted)}
