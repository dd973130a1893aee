"""The evaluation report: a Markdown page, a self-contained HTML page (plots embedded) and DVC metrics.

Its first lines answer one question with numbers: does the predictor make generation faster than the best
fixed gamma, measured in wall-clock time, without changing the output?
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from profiling.atomic import write_bytes
from profiling.costmodel import CostModel
from profiling.errors import SpeckvError

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
LIVE_BASES = {"best-fixed": "best_fixed", "fixed:4": "fixed4", "none": "none", "hf-assisted": "hf_assisted"}


@dataclass
class ReportConfig:
    eval_dir: str = "artifacts/eval"  # summary.json, replay.parquet, live.parquet from `speckv evaluate`
    predictor_dir: str = "artifacts/predictor"  # metrics.json, importance.md, reliability.png, importance.png
    calibrate_dir: str = "artifacts/calibrate"  # cost models, plotted
    out_dir: str = "artifacts/report"  # report.md, report.html, metrics.json, *.png


def _png(fig: plt.Figure) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _ci(entry: dict | None) -> str:
    if not entry:
        return "n/a"
    return f"{entry['ratio']:.3f}× [{entry['low']:.3f}, {entry['high']:.3f}]"


def load_inputs(config: ReportConfig) -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    eval_dir = Path(config.eval_dir)
    summary_path = eval_dir / "summary.json"
    if not summary_path.is_file():
        raise SpeckvError(f"no evaluation summary at {summary_path} (run `speckv evaluate`)")
    try:
        summary = json.loads(summary_path.read_text())
        replay = pd.read_parquet(eval_dir / "replay.parquet")
    except (OSError, ValueError) as exc:
        raise SpeckvError(f"evaluation outputs in {eval_dir} are missing or corrupt: {exc}") from exc
    live_path = eval_dir / "live.parquet"
    live = pd.read_parquet(live_path) if live_path.is_file() else pd.DataFrame()
    return summary, replay, live


def dvc_metrics(summary: dict) -> dict[str, Any]:
    """The metrics.json DVC tracks: headline ratios (with CI bounds), losslessness, gap share, overhead."""
    metrics: dict[str, Any] = {"live": {}, "replay": {}, "overhead": summary["overhead"]}
    live = summary.get("live")
    if live:
        for base, key in LIVE_BASES.items():
            ci = live["ratios"].get(f"mlp_vs_{base}")
            if ci:
                metrics["live"][f"speedup_mlp_vs_{key}"] = ci["ratio"]
                metrics["live"][f"speedup_mlp_vs_{key}_low"] = ci["low"]
                metrics["live"][f"speedup_mlp_vs_{key}_high"] = ci["high"]
        metrics["live"]["lossless"] = live["lossless"]
        metrics["live"]["hf_matches_none"] = live["hf_matches_none"]
    share = summary["replay"]["oracle_gap_share"]
    metrics["replay"]["oracle_gap_share"] = share["share"]
    test = summary["replay"]["test"]["vs_best_fixed"]["all"]
    for role in ("mlp", "oracle"):
        if role in test:
            metrics["replay"][f"speedup_{role}_vs_best_fixed"] = test[role]["vs_best-fixed"]["ratio"]
    metrics["promotion"] = {"promoted": summary["promotion"]["promoted"]}
    return metrics


def headline(summary: dict) -> list[str]:
    """The first lines of the report: the verdict and the numbers behind it."""
    live = summary.get("live", {})
    ratios = live.get("ratios", {})
    replay_all = summary["replay"]["test"]["vs_best_fixed"]["all"]
    replay_mlp = replay_all.get("mlp", {}).get("vs_best-fixed")
    share = summary["replay"]["oracle_gap_share"]
    decisive = ratios.get("mlp_vs_best-fixed") or replay_mlp
    where = "live wall-clock" if "mlp_vs_best-fixed" in ratios else "replay (modelled time)"
    if decisive is None:
        verdict = "No MLP results: nothing to conclude."
    elif decisive["low"] > 1.0:
        verdict = f"**The predictor pays**: it beats the best fixed gamma ({where}, CI above 1)."
    elif decisive["high"] < 1.0:
        verdict = (
            f"**The predictor does not pay**: it is slower than the best fixed gamma ({where}, CI below 1)."
        )
    else:
        verdict = (
            f"**No evidence that the predictor pays**: vs the best fixed gamma the CI spans 1 ({where})."
        )
    lines = [verdict, ""]
    config = summary["config"]
    best = ", ".join(f"{c}: `{t['best-fixed']}`" for c, t in summary["tuned"].items())
    if ratios:
        lines.append(
            f"- Live on {', '.join(config['live_controllers'])}, test prompts ({config['live_per_task']} per "
            f"task, {config['max_new_tokens']} new tokens), wall-clock tokens/s ratio, "
            f"{100 * config['ci_level']:g}% paired bootstrap CI over prompts (best fixed, chosen on dev: {best}):"
        )
        for base in LIVE_BASES:
            if f"mlp_vs_{base}" in ratios:
                lines.append(f"  - MLP vs {base}: {_ci(ratios[f'mlp_vs_{base}'])}")
        lossless = "yes" if live.get("lossless") else "**NO**"
        lines.append(f"- Lossless (every greedy run of our loop token-identical to `none`): {lossless}")
        hf = "yes" if live.get("hf_matches_none") else "no"
        lines.append(f"- transformers assisted generation output identical to `none`: {hf}")
    else:
        lines.append("- No live runs in this evaluation (replay only).")
    lines.append(f"- Replay, test prompts, all compressions: MLP vs best fixed {_ci(replay_mlp)}")
    oracle = replay_all.get("oracle", {}).get("vs_best-fixed")
    lines.append(
        f"- Oracle (hindsight-optimal gamma) vs best fixed: {_ci(oracle)}; the MLP closes "
        f"{100 * share['share']:.0f}% [{100 * share['low']:.0f}%, {100 * share['high']:.0f}%] of that gap"
        + (" (negative: it is slower than best fixed)" if share["share"] < 0 else "")
    )
    no_draft = [c for c, t in summary["tuned"].items() if t["best-fixed"] == "none"]
    if no_draft:
        lines.append(
            f"- On {', '.join(no_draft)} the best fixed policy is `none` (no fixed gamma beats the target alone); "
            "the MLP drafts there only when its running first-token acceptance says a draft pays, and probes "
            "once every few idle steps"
        )
    lines.append(f"- MLP decision overhead: {summary['overhead']['decision_ms']:.4f} ms per drafted token")
    lines.append(f"- Promotion: {summary['promotion']['reason']}")
    return lines


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


def gamma_figure(replay: pd.DataFrame) -> plt.Figure:
    """Share of steps drafting each gamma, per policy (test replay, all compressions)."""
    test = replay[replay["split"] == "test"]
    roles = [r for r in (*SHOWN[1:], "oracle") if (test["policy"] == r).any()]
    gamma_max = int(max(max(g) if len(g) else 0 for g in test["gammas"]))
    fig, axes = plt.subplots(1, len(roles), figsize=(2.2 * len(roles), 2.8), sharey=True, squeeze=False)
    for ax, role in zip(axes[0], roles, strict=True):
        gammas = np.concatenate([np.asarray(g) for g in test.loc[test["policy"] == role, "gammas"]])
        counts = np.bincount(gammas, minlength=gamma_max + 1)
        ax.bar(range(gamma_max + 1), counts / max(counts.sum(), 1))
        ax.set_title(role, fontsize=8)
        ax.set_xlabel("gamma", fontsize=8)
    axes[0][0].set_ylabel("share of steps")
    return fig


def acceptance_figure(replay: pd.DataFrame) -> plt.Figure:
    """P(token j accepted | tokens before it accepted), from full drafts (fixed:gamma_max replay, test)."""
    test = replay[replay["split"] == "test"]
    gamma_max = int(max(max(g) if len(g) else 0 for g in test["gammas"]))
    full = test[test["policy"] == f"fixed:{gamma_max}"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for compression, rows in full.groupby("compression"):
        gammas = np.concatenate([np.asarray(g) for g in rows["gammas"]])
        accepts = np.concatenate([np.asarray(a) for a in rows["accepts"]])
        rate = []
        for j in range(gamma_max):
            reached = (accepts >= j) & (gammas > j)
            rate.append((accepts[reached] > j).mean() if reached.any() else np.nan)
        ax.plot(range(1, gamma_max + 1), rate, marker="o", label=str(compression))
    ax.set_xlabel("draft position")
    ax.set_ylabel("conditional acceptance")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    return fig


def cost_figure(calibrate_dir: str, compressions: list[str]) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for c in compressions:
        path = Path(calibrate_dir) / f"{c}.json"
        if path.is_file():
            cost = CostModel.load(path)
            ax.plot([cost.step_ms(g) for g in range(cost.gamma_max + 1)], marker="o", label=f"{c} step")
            ax.plot(cost.verify_ms, ls="--", label=f"{c} verify (draft {cost.draft_ms:.1f} ms/token)")
    ax.set_xlabel("gamma (tokens drafted)")
    ax.set_ylabel("modelled ms per step")
    ax.legend(fontsize=7)
    return fig


def policy_table(summary: dict, split: str = "test") -> list[str]:
    table = summary["replay"][split]["vs_best_fixed"]
    groups = list(table)
    lines = ["| policy | " + " | ".join(f"{g} tok/s | {g} ÷ best fixed" for g in groups) + " |"]
    lines.append("|---" * (1 + 2 * len(groups)) + "|")
    roles = list(dict.fromkeys(r for g in groups for r in table[g]))
    for role in roles:
        cells = []
        for g in groups:
            entry = table[g].get(role)
            cells += [
                f"{entry['tokens_per_s']:.1f}" if entry else "",
                _ci(entry.get("vs_best-fixed")) if entry else "",
            ]
        lines.append(f"| {role} | " + " | ".join(cells) + " |")
    return lines


def group_table(table: dict, roles: list[str], base: str) -> list[str]:
    """Rows: `all` and each compression/task group; cells: each role's tokens/s ratio to `base` with its CI."""
    roles = [r for r in roles if any(r in entry for entry in table.values())]
    lines = [f"| group | {base} tok/s | " + " | ".join(f"{r} ÷ {base}" for r in roles) + " |"]
    lines.append("|---" * (2 + len(roles)) + "|")
    for group, entry in table.items():
        rate = entry.get(base, {}).get("tokens_per_s")
        cells = [_ci(entry.get(r, {}).get(f"vs_{base}")) for r in roles]
        lines.append(f"| {group} | {rate:.1f} | " + " | ".join(cells) + " |" if rate else f"| {group} | | |")
    return lines


def _num(value: float) -> str:
    return "–" if not np.isfinite(value) else f"{value:.2f}"


def live_table(live: pd.DataFrame) -> list[str]:
    grouped = live.groupby(["compression", "policy"], sort=False)
    lines = [
        "| compression | policy | spec | tok/s | acceptance | accepted/step | lossless |",
        "|---|---|---|---|---|---|---|",
    ]
    for (compression, policy), rows in grouped:
        tps = rows["new_tokens"].sum() / rows["wall_s"].sum()
        acc = (
            rows["accepted"].sum() / rows["drafted"].sum()
            if "drafted" in rows and rows["drafted"].sum() > 0
            else np.nan
        )
        per_step = (
            rows["accepted"].sum() / rows["steps"].sum()
            if "steps" in rows and rows["steps"].sum() > 0
            else np.nan
        )
        lines.append(
            f"| {compression} | {policy} | {rows['spec'].iloc[0]} | {tps:.1f} | {_num(acc)} | {_num(per_step)} | "
            f"{'yes' if rows['matches_none'].all() else 'NO'} |"
        )
    return lines


def build_report(config: ReportConfig) -> dict[str, Any]:
    """Write report.md, report.html, metrics.json and the plots; returns the DVC metrics."""
    summary, replay, live = load_inputs(config)
    out = Path(config.out_dir)
    compressions = sorted(replay["compression"].astype(str).unique())
    figures = {
        "goodput.png": ("Tokens/s ratios per policy, 95% CIs", _png(goodput_figure(summary))),
        "gamma_hist.png": ("Gamma chosen per step, per policy (test replay)", _png(gamma_figure(replay))),
        "acceptance.png": ("Acceptance by draft position", _png(acceptance_figure(replay))),
        "costmodel.png": ("Measured cost model", _png(cost_figure(config.calibrate_dir, compressions))),
    }
    predictor_dir = Path(config.predictor_dir)
    for name, title in (
        ("reliability.png", "Calibration (test prompts)"),
        ("importance.png", "Feature importances"),
    ):
        if (predictor_dir / name).is_file():
            figures[name] = (title, (predictor_dir / name).read_bytes())

    md = ["# SpecKV: does the learned gamma predictor pay?", "", *headline(summary), ""]
    md += ["## Replay on test prompts (exact, time from the cost model)", "", *policy_table(summary), ""]
    md.append(
        "Tuned on dev per compression: "
        + "; ".join(
            f"{c}: best fixed `{t['best-fixed']}`, "
            f"threshold `{t['threshold:tuned']}`, entropy `{t['entropy:tuned']}`"
            for c, t in summary["tuned"].items()
        )
    )
    md.append("")
    md += ["### Per compression and task (test replay)", ""]
    md += [
        *group_table(
            summary["replay"]["test"]["by_task"], ["mlp", "paper", "threshold:tuned", "oracle"], "best-fixed"
        ),
        "",
    ]
    if not live.empty:
        md += ["## Live wall-clock runs (test prompts)", "", *live_table(live), ""]
        roles = [r for r in dict.fromkeys(live["policy"]) if r != "none"]
        md += ["### Tokens/s ratio to `none`, per compression and task (live)", ""]
        md += [*group_table(summary["live"]["vs_none_by_task"], roles, "none"), ""]
    md += ["## Predictor", ""]
    metrics_path = predictor_dir / "metrics.json"
    if metrics_path.is_file():
        models = json.loads(metrics_path.read_text()).get("models", {})
        md += ["| model | ROC AUC | log loss | Brier |", "|---|---|---|---|"]
        md += [
            f"| {k} | {v['roc_auc']:.4f} | {v['log_loss']:.4f} | {v['brier']:.4f} |"
            for k, v in models.items()
        ]
        md += [
            "",
            "The paper's formulation (`paper_step_regression` above: a step's acceptance rate from "
            "aggregates of that step's own draft) needs inputs that exist only after the draft it would "
            "size. The `paper` policy is its closest deployable reading: the same regressor, refitted on "
            "train prompts, fed the previous step's aggregates, choosing gamma at step start.",
            "",
        ]
    if (predictor_dir / "importance.md").is_file():
        md += [
            "### Feature importance beside the paper's ranking",
            "",
            (predictor_dir / "importance.md").read_text(),
            "",
        ]
    md += ["## Plots", ""] + [f"![{title}]({name})" for name, (title, _) in figures.items()]

    for name, (_, data) in figures.items():
        write_bytes(out / name, data)
    markdown = "\n".join(md) + "\n"
    write_bytes(out / "report.md", markdown.encode())
    write_bytes(out / "report.html", render_html(markdown, figures).encode())
    metrics = dvc_metrics(summary)
    write_bytes(out / "metrics.json", json.dumps(metrics, indent=2).encode())
    return metrics


def render_html(markdown: str, figures: dict[str, tuple[str, bytes]]) -> str:
    """A dependency-free rendering: the Markdown as preformatted text up to the plots, then embedded PNGs."""
    text = markdown.split("## Plots")[0]
    images = "".join(
        f"<figure><img src='data:image/png;base64,{base64.b64encode(data).decode()}' "
        f"alt='{html.escape(title)}'>"
        f"<figcaption>{html.escape(title)}</figcaption></figure>"
        for title, data in figures.values()
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>SpecKV report</title>"
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}pre{white-space:pre-wrap}"
        "img{max-width:100%}</style></head><body>"
        f"<pre>{html.escape(text)}</pre><h2>Plots</h2>{images}</body></html>"
    )
