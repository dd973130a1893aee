"""Permutation importance of the deployed predictor on test prompts, per feature and per correlated group.

The published SpecKV importances were Gini importances of a different model; these explain the exported
MLP (calibration included) by how much test performance drops when a feature's values are shuffled.
Grouped importance shuffles correlated features together (e.g. draft_prob with its running aggregates),
where single-feature shuffles understate each one because its correlates still carry the signal.
"""

from __future__ import annotations

from collections.abc import Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from sklearn.frozen import FrozenEstimator
from sklearn.inspection import permutation_importance
from speckv.predictor.features import COMPRESSIONS, FEATURES
from speckv.predictor.model import scores
from speckv.predictor.runtime import AcceptancePredictor
from speckv.profiling.signals import AGGREGATES

SCORINGS = ("roc_auc", "neg_log_loss")


def _with_aggregates(*signals: str) -> tuple[str, ...]:
    return tuple(n for s in signals for n in (s, *(f"{s}_{a}" for a in AGGREGATES)))


FEATURE_GROUPS: dict[str, tuple[str, ...]] = {
    "confidence (draft_prob, top1_prob, margin + running aggs)": _with_aggregates(
        "draft_prob", "top1_prob", "margin"
    ),
    "entropy + running aggs": _with_aggregates("entropy"),
    "draft_index": ("draft_index",),
    "position": ("log1p_position",),
    "target confidence (target_top1, target_entropy, target_recent)": (
        "target_top1",
        "target_entropy",
        "target_recent",
    ),
    "compression": tuple(f"compression={c}" for c in COMPRESSIONS),
}

# The published ranking (SpecKV paper, Gini importance), with our nearest feature or group.
PAPER_RANKING = (
    ("min draft confidence", 30.0, "draft_prob_min"),
    ("max draft entropy", 24.1, "entropy_max"),
    ("mean draft confidence", 21.8, "draft_prob_mean"),
    ("mean draft entropy", 17.7, "entropy_mean"),
    ("gamma", 3.4, "draft_index"),  # gamma is not known at decision time; draft_index is the nearest
    ("compression", 3.1, "compression"),
)


def scorer(scoring: str) -> Callable[[object, np.ndarray, np.ndarray], float]:
    """A higher-is-better scorer that accepts soft labels (see model.scores)."""
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
    key, sign = ("roc_auc", 1.0) if scoring == "roc_auc" else ("log_loss", -1.0)
    return lambda model, X, y: sign * scores(y, model.predict_proba(X))[key]


def feature_importance(
    predictor: AcceptancePredictor,
    X: np.ndarray,
    y: np.ndarray,
    scoring: str,
    n_repeats: int,
    seed: int,
    names: tuple[str, ...] = FEATURES,
) -> dict[str, dict[str, float]]:
    """sklearn's permutation importance of each feature (`names`, X's columns): mean and std of the score
    drop over repeats."""
    result = permutation_importance(
        FrozenEstimator(predictor), X, y, scoring=scorer(scoring), n_repeats=n_repeats, random_state=seed
    )
    return {
        name: {"mean": float(m), "std": float(s)}
        for name, m, s in zip(names, result.importances_mean, result.importances_std, strict=True)
    }


def group_importance(
    predictor: AcceptancePredictor, X: np.ndarray, y: np.ndarray, scoring: str, n_repeats: int, seed: int
) -> dict[str, dict[str, float]]:
    """Score drop when each group's columns are shuffled together (one row permutation for the group)."""
    score = scorer(scoring)
    baseline = score(predictor, X, y)
    rng = np.random.default_rng(seed)
    out = {}
    for group, names in FEATURE_GROUPS.items():
        columns = [FEATURES.index(n) for n in names]
        drops = []
        for _ in range(n_repeats):
            shuffled = X.copy()
            shuffled[:, columns] = X[rng.permutation(len(X))][:, columns]
            drops.append(baseline - score(predictor, shuffled, y))
        out[group] = {"mean": float(np.mean(drops)), "std": float(np.std(drops)), "features": list(names)}
    return out


def shares(importance: dict[str, dict]) -> dict[str, float]:
    """Each entry's share (%) of the total positive mean importance, comparable to the paper's percentages."""
    positive = {k: max(v["mean"], 0.0) for k, v in importance.items()}
    total = sum(positive.values()) or 1.0
    return {k: 100.0 * v / total for k, v in positive.items()}


def paper_comparison(features: dict[str, dict], groups: dict[str, dict]) -> list[dict]:
    """The paper's ranking beside our share and rank of the matching feature (compression: its group)."""
    feature_share = shares(features)
    ranked = sorted(feature_share, key=feature_share.get, reverse=True)
    group_share = shares(groups)
    rows = []
    for paper_name, paper_pct, ours in PAPER_RANKING:
        if ours == "compression":
            rows.append(
                {
                    "paper_feature": paper_name,
                    "paper_pct": paper_pct,
                    "our_feature": "compression group",
                    "our_pct": group_share["compression"],
                    "our_rank": None,
                }
            )
            continue
        rows.append(
            {
                "paper_feature": paper_name,
                "paper_pct": paper_pct,
                "our_feature": ours,
                "our_pct": feature_share[ours],
                "our_rank": ranked.index(ours) + 1,
            }
        )
    return rows


def comparison_markdown(rows: list[dict]) -> str:
    lines = ["| paper feature | paper % | our feature | our % | our rank |", "|---|---|---|---|---|"]
    for r in rows:
        rank = "-" if r["our_rank"] is None else str(r["our_rank"])
        ours = f"{r['our_feature']} | {r['our_pct']:.1f} | {rank}"
        lines.append(f"| {r['paper_feature']} | {r['paper_pct']:.1f} | {ours} |")
    return "\n".join(lines) + "\n"


def importance_figure(features: dict[str, dict], groups: dict[str, dict], scoring: str) -> plt.Figure:
    """Horizontal bars (mean ± std) of single-feature and grouped importance, side by side."""
    fig, axes = plt.subplots(1, 2, figsize=(13, 7), gridspec_kw={"width_ratios": [3, 2]})
    for ax, data, title in ((axes[0], features, "per feature"), (axes[1], groups, "per group")):
        names = sorted(data, key=lambda n: data[n]["mean"])
        ax.barh(
            names, [data[n]["mean"] for n in names], xerr=[data[n]["std"] for n in names], color="tab:blue"
        )
        ax.set_title(f"permutation importance, {title}")
        ax.set_xlabel(f"drop in test {scoring}")
        ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    return fig
