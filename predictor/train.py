"""The training stage as one library call: data → models → calibration → stop rule → scores → export.

Everything tunable is fitted on train prompts or tuned on dev prompts; test prompts are only scored.
Test metrics, replayed goodput and importances are computed with the runtime predictor built from the
export, so they describe exactly what the decode loop will run.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from speckv.predictor import importance, model
from speckv.predictor.dataset import (
    Split,
    build_splits,
    split_drafts,
    trace_start_frame,
    trace_token_frame,
)
from speckv.predictor.export import build_meta, build_predictor, initial_stop_rule, write_export
from speckv.predictor.features import (
    COMPRESSIONS,
    FEATURES,
    RUNNING,
    START_FEATURES,
    STEP_KEYS,
    table_start_features,
)
from speckv.predictor.runtime import AcceptancePredictor, MLPController
from speckv.predictor.stats import pooled_rate
from speckv.profiling.atomic import atomic_path, write_text
from speckv.profiling.controllers import Controller, parse_controller
from speckv.profiling.costmodel import CostModel, StepCosts
from speckv.profiling.errors import SpeckvError
from speckv.profiling.replay import Trace, load_traces, replay

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    traces_dir: str = "artifacts/profile/traces"  # dense greedy traces: the predictor's rows and replay
    calibrate_dir: str = "artifacts/calibrate"  # cost models, one {compression}.json per compression
    out_dir: str = "artifacts/predictor"  # metrics.json, plots, importance.json
    export_dir: str = "artifacts/predictor/export"  # the deployed model (numpy-loadable)
    seed: int = 0
    hidden_units: int = 16
    alpha_grid: list[float] = field(
        default_factory=lambda: [1e-4, 1e-2, 0.1, 1.0, 3.0]
    )  # L2 penalties; dev picks
    max_iter: int = 500  # L-BFGS iterations
    calibrations: list[str] = field(default_factory=lambda: ["none", "platt", "isotonic"])
    discount_grid: list[float] = field(default_factory=lambda: [round(0.5 + 0.05 * i, 2) for i in range(15)])
    start_discount_grid: list[float | None] = field(
        default_factory=lambda: [None, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0]
    )  # step-start rule discounts (None: no step-start decision), tuned with discount by dev replay
    trim_options: list[bool] = field(default_factory=lambda: [False, True])  # trim tried on and off on dev
    importance_scoring: str = "neg_log_loss"  # or roc_auc (greedy labels only are meaningful for AUC)
    importance_repeats: int = 5
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    artifact_location: str = "mlartifacts"  # where a new MLflow experiment stores artifacts
    experiment: str = "speckv-train"
    register: bool = True  # register the export as speckv-gamma-predictor@candidate

    def __post_init__(self) -> None:
        # Checked here so a typo fails before minutes of training, not after.
        problems = []
        if not set(self.calibrations) <= {"none", "platt", "isotonic"} or not self.calibrations:
            problems.append("calibrations must be a non-empty subset of none, platt, isotonic")
        if self.importance_scoring not in importance.SCORINGS:
            problems.append(f"importance_scoring must be one of {importance.SCORINGS}")
        if not self.discount_grid or min(self.discount_grid) <= 0:
            problems.append("discount_grid must hold positive numbers")
        if not self.start_discount_grid or any(s is not None and s <= 0 for s in self.start_discount_grid):
            problems.append("start_discount_grid must hold positive numbers (or null: always draft)")
        if not self.trim_options or not all(isinstance(t, bool) for t in self.trim_options):
            problems.append("trim_options must hold true and/or false")
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
    config: TrainConfig,
) -> tuple[dict[str, Any], dict[str, float]]:
    """The (discount, start_discount, trim) with the best replayed tokens/s on `traces` (dev prompts).

    Tuned over all compressions together (the export's default) and for each compression alone (its
    `by_compression` entry, what MLPController uses): a quantized target's cheaper or dearer verify moves the
    best stopping point, as it moves the best fixed gamma. Ties go to the first in grid order. The replay
    runs the very controller the decode loop runs.
    """
    grid = [
        {"discount": d, "start_discount": s, "trim": t}
        for t in config.trim_options
        for s in config.start_discount_grid
        for d in config.discount_grid
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


def fit_start_model(
    start_rows: pd.DataFrame, config: TrainConfig
) -> tuple[Any, dict[str, Any], dict[str, np.ndarray]]:
    """The step-start model: P(first drafted token accepted) from what is known before drafting.

    Same 16-unit MLP, L2 chosen by dev log loss. Returns the model, its metrics and test predictions.
    """
    X = {s: table_start_features(start_rows[start_rows["split"] == s]) for s in ("train", "dev", "test")}
    y = {s: start_rows.loc[start_rows["split"] == s, "first_accepted"].to_numpy(np.float64) for s in X}
    fits = {}
    for alpha in config.alpha_grid:
        spec = model.MLPSpec(config.hidden_units, alpha, config.max_iter, config.seed)
        candidate = model.fit_mlp(X["train"], y["train"], spec)
        fits[alpha] = (
            model.scores(y["dev"], model.positive_proba(candidate, X["dev"]))["log_loss"],
            candidate,
        )
    alpha = min(fits, key=lambda a: fits[a][0])
    fitted = fits[alpha][1]
    top1_only = model.fit_logistic(X["train"][:, :1], y["train"], config.seed)
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


def run_training(config: TrainConfig) -> dict[str, Any]:
    """Train, tune, score, explain and export; returns the metrics written to metrics.json."""
    out_dir = Path(config.out_dir)
    traces = load_traces(config.traces_dir)
    frame = trace_token_frame(traces)
    splits = build_splits(frame)
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

    # Step 3: the step-start model (draft at all?) on the same traces, one row per position.
    start_model, start_metrics, start_test = fit_start_model(trace_start_frame(traces), config)
    log.info("step-start model: %s", {k: v["roc_auc"] for k, v in start_metrics["test"].items()})

    # Step 4: the stop rule (discount, start discount, trim), tuned by replaying the deployed controller on
    # dev traces with the measured cost models.
    compressions = sorted({t.compression for t in traces})
    step_costs = load_step_costs(config.calibrate_dir, compressions)
    gamma_max = min(min(t.gamma_max for t in traces), *(len(c) - 1 for c in step_costs.values()))
    step_costs = {c: cost.upto(gamma_max) for c, cost in step_costs.items()}
    # the rule decides with what it pays: its draft and target signals are in its own cost table
    decision_costs = {c: cost.with_signals(target_signals=True) for c, cost in step_costs.items()}
    meta = build_meta(calibration, initial_stop_rule(decision_costs, gamma_max), "greedy", asdict(config))
    predictor, weights = build_predictor(mlp, calibration, arrays, meta, start_model)
    dev_traces = [t for t in traces if t.split == "dev"]
    test_traces = [t for t in traces if t.split == "test"]
    chosen, dev_goodput = tune_stop_rule(predictor, dev_traces, step_costs, gamma_max, config)
    log.info("stop rule %s", chosen)

    # Step 5: scores on test prompts — the deployed predictor, the raw MLP and every baseline.
    test = splits["test"]
    predictions = {"mlp": predictor.predict_proba(test.X), "mlp_uncalibrated": predictor.predict_raw(test.X)}
    for name, (fitted, cols) in baselines.items():
        predictions[name] = model.positive_proba(fitted, test.X[:, cols])
    metrics: dict[str, Any] = {"models": {name: model.scores(test.y, p) for name, p in predictions.items()}}
    metrics["models"]["paper_step_regression"] = paper_reference(frame, spec)
    metrics["start_model"] = start_metrics
    metrics["replay_test_tokens_per_s"] = {
        "mlp_stop_rule": replayed_goodput(mlp_for(predictor, gamma_max), test_traces, step_costs),
        **{
            fixed: replayed_goodput(
                lambda c, fixed=fixed: parse_controller(fixed, gamma_max), test_traces, step_costs
            )
            for fixed in ["none", *(f"fixed:{g}" for g in range(1, gamma_max + 1))]
        },
    }
    metrics["calibration"] = {"chosen": kind, "dev_log_loss": dev_losses}
    metrics["alpha"] = {"chosen": alpha, "dev_log_loss": {f"{a:g}": f[0] for a, f in fits.items()}}
    metrics["stop_rule"] = {**chosen, "gamma_max": gamma_max, "dev_tokens_per_s": dev_goodput}
    metrics["rows"] = {k: len(s.y) for k, s in splits.items()}
    metrics["traces"] = {s: sum(t.split == s for t in traces) for s in ("train", "dev", "test")}

    # Step 6: permutation importance of the deployed predictor (and of the step-start model) on test prompts.
    args = (predictor, test.X, test.y, config.importance_scoring, config.importance_repeats, config.seed)
    features, groups = importance.feature_importance(*args), importance.group_importance(*args)
    comparison = importance.paper_comparison(features, groups)
    importances = {
        "scoring": config.importance_scoring,
        "features": features,
        "groups": groups,
        "paper": comparison,
        "start_model": importance.feature_importance(
            predictor.start,
            start_test["X"],
            start_test["y"],
            config.importance_scoring,
            config.importance_repeats,
            config.seed,
            names=START_FEATURES,
        ),
    }

    # Step 7: write everything, each file atomically, then the export directory.
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


def paper_reference(tokens: pd.DataFrame, spec: model.MLPSpec) -> dict[str, float]:
    """Fit the published step-rate regression on train prompts' full drafts (trace positions as fixed:gamma_max
    steps); score it on test prompts' tokens (every labelled token gets its step's predicted rate) and steps."""
    X_train, train_rows = split_drafts(tokens, "train")
    X_steps, rate, _ = paper_step_table(X_train, train_rows)
    fitted = model.fit_step_regressor(X_steps, rate, spec)
    X_test, test_rows = split_drafts(tokens, "test")
    X_steps, rate, step_id = paper_step_table(X_test, test_rows)
    predicted = np.clip(fitted.predict(X_steps), 0.0, 1.0)
    labelled = test_rows["labelled"].to_numpy(bool)
    token_rate = predicted[step_id.to_numpy()][labelled]
    y = test_rows.loc[labelled, "accepted"].to_numpy(np.float64)
    return {**model.scores(y, token_rate), **model.step_scores(rate, predicted)}
