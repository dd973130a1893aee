"""The report's matplotlib figures (PNG bytes) and the acceptance-by-position table behind one of them."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from speckv.profiling.costmodel import CostModel

# Policies shown in the per-policy plots, in order (gamma histograms skip `none`, which never drafts).
SHOWN = (
    "none",
    "fixed:4",
    "best-fixed",
    "heuristic",
    "threshold:0.4",
    "threshold:tuned",
    "entropy:tuned",
    "paper",
    "mlp",
)


def to_png(fig: plt.Figure) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def goodput_figure(summary: dict) -> plt.Figure:
    """Ratio to the best fixed gamma (replay, test) and to `none` (live), with CIs, per policy."""
    panels = [
        ("replay (test): tokens/s ÷ best fixed", summary["replay"]["test"]["vs_best_fixed"], "vs_best-fixed")
    ]
    if summary.get("live"):
        panels.append(("live (test): tokens/s ÷ none", summary["live"]["vs_none"], "vs_none"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (title, table, key) in zip(axes[0], panels, strict=True):
        groups = [g for g in table if g != "all"] or ["all"]
        roles = [
            r
            for r in dict.fromkeys(r for g in groups for r in table[g])
            if key in table[groups[0]].get(r, {})
        ]
        width = 0.8 / len(groups)
        for j, group in enumerate(groups):
            entries = [table[group].get(r, {}).get(key) for r in roles]
            ratio = np.array([e["ratio"] if e else np.nan for e in entries])
            err = np.array(
                [[e["ratio"] - e["low"], e["high"] - e["ratio"]] if e else [0, 0] for e in entries]
            ).T
            ax.barh(np.arange(len(roles)) + j * width, ratio, width, xerr=err, label=group, capsize=2)
        ax.axvline(1.0, color="black", lw=0.8)
        ax.set_yticks(np.arange(len(roles)) + 0.4 - width / 2, roles, fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
    return fig


def _max_gamma(test: pd.DataFrame) -> int:
    return int(max(max(g) if len(g) else 0 for g in test["gammas"]))


def gamma_figure(replay: pd.DataFrame) -> plt.Figure:
    """Share of steps drafting each gamma, per policy (test replay, all compressions)."""
    test = replay[replay["split"] == "test"]
    roles = [r for r in (*SHOWN[1:], "oracle") if (test["policy"] == r).any()]
    gamma_max = _max_gamma(test)
    fig, axes = plt.subplots(1, len(roles), figsize=(2.2 * len(roles), 2.8), sharey=True, squeeze=False)
    for ax, role in zip(axes[0], roles, strict=True):
        gammas = np.concatenate([np.asarray(g) for g in test.loc[test["policy"] == role, "gammas"]])
        counts = np.bincount(gammas, minlength=gamma_max + 1)
        ax.bar(range(gamma_max + 1), counts / max(counts.sum(), 1))
        ax.set_title(role, fontsize=8)
        ax.set_xlabel("gamma", fontsize=8)
    axes[0][0].set_ylabel("share of steps")
    return fig


def acceptance_by_position(replay: pd.DataFrame) -> pd.DataFrame:
    """P(token j accepted | tokens before it accepted) per draft position (rows) and compression (columns),
    from full drafts (fixed:gamma_max replay, test)."""
    test = replay[replay["split"] == "test"]
    gamma_max = _max_gamma(test)
    full = test[test["policy"] == f"fixed:{gamma_max}"]
    columns = {}
    for compression, rows in full.groupby("compression", observed=True):
        gammas = np.concatenate([np.asarray(g) for g in rows["gammas"]])
        accepts = np.concatenate([np.asarray(a) for a in rows["accepts"]])
        rate = []
        for j in range(gamma_max):
            reached = (accepts >= j) & (gammas > j)
            rate.append((accepts[reached] > j).mean() if reached.any() else np.nan)
        columns[str(compression)] = rate
    return pd.DataFrame(columns, index=pd.RangeIndex(1, gamma_max + 1, name="position"))


def acceptance_figure(rates: pd.DataFrame) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for compression in rates:
        ax.plot(rates.index, rates[compression], marker="o", label=compression)
    ax.set_xlabel("draft position")
    ax.set_ylabel("conditional acceptance")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    return fig


def cost_figure(calibrate_dir: str, compressions: list[str]) -> plt.Figure:
    """Modelled decode-step ms per gamma: solid at the shortest calibrated context, dashed at the longest."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for c in compressions:
        path = Path(calibrate_dir) / f"{c}.json"
        if path.is_file():
            cost = CostModel.load(path)
            lo, hi = cost.meta.get("fit", {}).get("contexts", [cost.context_tokens] * 2)
            gammas = range(cost.gamma_max + 1)
            line = ax.plot(
                [cost.step_at(g, lo) for g in gammas],
                marker="o",
                label=f"{c} at {lo:.0f} tokens (draft {cost.draft_ms:.1f} ms/token)",
            )[0]
            ax.plot(
                [cost.step_at(g, hi) for g in gammas],
                ls="--",
                color=line.get_color(),
                label=f"{c} at {hi:.0f}",
            )
    ax.set_xlabel("gamma (tokens drafted)")
    ax.set_ylabel("modelled ms per decode step")
    ax.legend(fontsize=7)
    return fig
