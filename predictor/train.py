"""The training stage as one library call: data → models → calibration → stop rule → scores → export.

Everything tunable is fitted on train prompts or tuned on dev prompts; test prompts are only scored.
Test metrics, replayed goodput and importances are computed with the runtime predictor built from the
export, so they describe exactly what the decode loop will run. The steps' pieces: predictor.fitting (the
models), predictor.stop_rule (the tuned stop rule), predictor.paper_regression (the published baseline),
predictor.figures and predictor.importance (the figures).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from speckv.predictor import importance, model
from speckv.predictor.dataset import build_splits, trace_start_frame, trace_token_frame
from speckv.predictor.export import build_meta, build_predictor, initial_stop_rule, write_export
from speckv.predictor.features import START_FEATURES
from speckv.predictor.figures import reliability_figure, save_figure
from speckv.predictor.fitting import best_alpha, fit_baselines, fit_by_dev_loss, fit_start_model, prompt_folds
from speckv.predictor.paper_regression import paper_reference
from speckv.predictor.stop_rule import load_step_costs, mlp_for, replayed_goodput, tune_stop_rule
from speckv.profiling.atomic import write_text
from speckv.profiling.controllers import parse_controller
from speckv.profiling.errors import SpeckvError
from speckv.profiling.replay import load_traces

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


def run_training(config: TrainConfig) -> dict[str, Any]:
    """Train, tune, score, explain and export; returns the metrics written to metrics.json."""
    out_dir = Path(config.out_dir)
    traces = load_traces(config.traces_dir)
    frame = trace_token_frame(traces)
    splits = build_splits(frame)
    log.info("rows: %s", {k: len(s.y) for k, s in splits.items()})

    # Step 1: the MLP (its L2 penalty chosen by dev log loss: small tables overfit) and the baselines.
    specs = [model.MLPSpec(config.hidden_units, a, config.max_iter, config.seed) for a in config.alpha_grid]
    train, dev = splits["train"], splits["dev"]
    fits = fit_by_dev_loss(train.X, train.y, dev.X, dev.y, specs)
    alpha = best_alpha(fits)
    _, mlp, spec = fits[alpha]
    log.info("MLP alpha %g (dev log loss %s)", alpha, {f"{a:g}": round(f[0], 4) for a, f in fits.items()})
    baselines = fit_baselines(splits, config.seed)

    # Step 2: calibration, only if it lowers cross-fitted dev log loss.
    p_dev = model.positive_proba(mlp, dev.X)
    kind, dev_losses = model.choose_calibration(
        p_dev, dev.y, prompt_folds(dev.rows), tuple(config.calibrations)
    )
    calibration, arrays = model.fit_calibration(p_dev, dev.y, kind)
    log.info("calibration %s (cross-fitted dev log loss %s)", kind, dev_losses)

    # Step 3: the step-start model (draft at all?) on the same traces, one row per position.
    start_model, start_metrics, start_test = fit_start_model(trace_start_frame(traces), specs, config.seed)
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
    chosen, dev_goodput = tune_stop_rule(
        predictor,
        dev_traces,
        step_costs,
        gamma_max,
        config.discount_grid,
        config.start_discount_grid,
        config.trim_options,
    )
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
    save_figure(
        reliability_figure(test.y, {k: v for k, v in predictions.items() if k != "mlp_uncalibrated"}),
        out_dir / "reliability.png",
    )
    save_figure(
        importance.importance_figure(features, groups, config.importance_scoring), out_dir / "importance.png"
    )
    write_export(config.export_dir, weights, predictor.meta)
    return metrics
