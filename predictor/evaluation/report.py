"""The evaluation report: an HTML page (Jinja2, tables and plots inline), the same content as Markdown for
diffs in git, DVC metrics and plot data, and the provenance of the run.

Its first lines answer one question with numbers: does the predictor make generation faster than the best
fixed gamma, measured in wall-clock time, without changing the output? Both pages are rendered from one list
of sections, so they cannot say different things.

Its parts: the tables in `report_tables.py`, the sections in `report_sections.py`, the rendering in
`report_render.py`, the plots in `report_plots.py`; this module reads the evaluation's outputs and writes
every file (`build_report`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from speckv.predictor.evaluation.comparisons import LIVE_BASES
from speckv.predictor.evaluation.report_batch import batch_figure, batch_metrics, batch_section, load_batch
from speckv.predictor.evaluation.report_plots import (
    acceptance_by_position,
    acceptance_figure,
    cost_figure,
    gamma_figure,
    goodput_figure,
    to_png,
)
from speckv.predictor.evaluation.report_render import render_html, render_markdown
from speckv.predictor.evaluation.report_sections import build_sections, verdict
from speckv.predictor.evaluation.report_tables import Figure, gap_shares
from speckv.profiling.atomic import write_bytes
from speckv.profiling.errors import SpeckvError

__all__ = ["ReportConfig", "build_report", "dvc_metrics", "load_inputs", "plot_data", "verdict"]


@dataclass
class ReportConfig:
    eval_dir: str = "artifacts/eval"  # summary.json, replay.parquet, live.parquet from `speckv evaluate`
    predictor_dir: str = "artifacts/predictor"  # metrics.json, importance.md, reliability.png, importance.png
    calibrate_dir: str = "artifacts/calibrate"  # cost models, plotted
    out_dir: str = "artifacts/report"  # report.md, report.html, metrics.json, provenance.json, *.png, plots/
    batch_dir: str = (
        "artifacts/batch"  # `speckv batch` outputs: gamma by batch size, speculation_schedule.json
    )


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


def _speedups(ratios: dict) -> dict[str, float]:
    """speedup_mlp_vs_<base> with its _low and _high bounds, for every live base that ran."""
    out = {}
    for base, key in LIVE_BASES.items():
        ci = ratios.get(f"mlp_vs_{base}")
        if ci:
            out |= {
                f"speedup_mlp_vs_{key}{end}": ci[part]
                for end, part in (("", "ratio"), ("_low", "low"), ("_high", "high"))
            }
    return out


def dvc_metrics(summary: dict) -> dict[str, Any]:
    """The metrics.json DVC tracks: headline ratios (with CI bounds), losslessness, gap share, overhead."""
    metrics: dict[str, Any] = {"live": {}, "replay": {}, "overhead": summary["overhead"]}
    live = summary.get("live")
    if live:
        metrics["live"] = _speedups(live["ratios"])
        metrics["live"]["lossless"] = live["lossless"]
        metrics["live"]["hf_matches_none"] = live["hf_matches_none"]
        if "ttft_s" in live:
            metrics["live"]["ttft_s"] = live["ttft_s"]["all"]
    if summary.get("live_e2e"):
        metrics["live_e2e"] = _speedups(summary["live_e2e"]["ratios"])
    fidelity = summary.get("fidelity")
    if fidelity:
        errors = ("max_abs_error", "ratio_max_abs_error")
        metrics["fidelity"] = {key: fidelity[key] for key in errors}
        if "tuning_model" in fidelity:
            metrics["fidelity"]["tuning_model"] = {key: fidelity["tuning_model"][key] for key in errors}
    share = gap_shares(summary).get("mlp", {}).get("all")
    if share:
        metrics["replay"]["oracle_gap_share"] = share.get("estimate", share.get("share"))
    test = summary["replay"]["test"]["vs_best_fixed"]["all"]
    for role in ("mlp", "oracle"):
        if role in test:
            metrics["replay"][f"speedup_{role}_vs_best_fixed"] = test[role]["vs_best-fixed"]["ratio"]
    metrics["promotion"] = {"promoted": summary["promotion"]["promoted"]}
    return metrics


def plot_data(summary: dict, rates: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """CSV tables for `dvc plots show` (templates in dvc.yaml): replay ratios, gap shares, acceptance."""
    table = summary["replay"]["test"]["vs_best_fixed"]["all"]
    ratios = pd.DataFrame(
        [
            {
                "policy": role,
                "ratio": e["vs_best-fixed"]["ratio"],
                "low": e["vs_best-fixed"]["low"],
                "high": e["vs_best-fixed"]["high"],
            }
            for role, e in table.items()
            if "vs_best-fixed" in e
        ]
    )
    shares = pd.DataFrame(
        [
            {"policy": policy, "share": e.get("estimate", e.get("share")), "low": e["low"], "high": e["high"]}
            for policy, by_group in gap_shares(summary).items()
            if (e := by_group.get("all"))
        ]
    )
    return {
        "replay_vs_best_fixed.csv": ratios,
        "gap_share.csv": shares,
        "acceptance_by_position.csv": rates.reset_index(),
    }


def build_report(config: ReportConfig, provenance: dict | None = None) -> dict[str, Any]:
    """Write report.html, report.md, metrics.json, provenance.json, the plots and plots/*.csv; returns the
    DVC metrics. `provenance` (predictor.provenance.collect) is shown at the end of both pages."""
    summary, replay, live = load_inputs(config)
    out = Path(config.out_dir)
    compressions = sorted(replay["compression"].astype(str).unique())
    rates = acceptance_by_position(replay)
    figures = {
        name: Figure(name, title, png)
        for name, title, png in (
            ("goodput.png", "Tokens/s ratios per policy, 95% CIs", to_png(goodput_figure(summary))),
            (
                "gamma_hist.png",
                "Gamma chosen per step, per policy (test replay)",
                to_png(gamma_figure(replay)),
            ),
            ("acceptance.png", "Acceptance by draft position", to_png(acceptance_figure(rates))),
            ("costmodel.png", "Measured cost model", to_png(cost_figure(config.calibrate_dir, compressions))),
        )
    }
    predictor_dir = Path(config.predictor_dir)
    for name, title in (
        ("reliability.png", "Calibration (test prompts)"),
        ("importance.png", "Feature importances"),
    ):
        if (predictor_dir / name).is_file():
            figures[name] = Figure(name, title, (predictor_dir / name).read_bytes())

    verdict_, sections = build_sections(summary, replay, live, figures, predictor_dir, provenance)
    batch = load_batch(config.batch_dir)
    if batch is not None:
        figure = Figure("batch.png", "Gamma by batch size", to_png(batch_figure(*batch)))
        figures[figure.name] = figure
        plots = next(i for i, section in enumerate(sections) if section.anchor == "plots")
        sections.insert(plots, batch_section(batch[0], figure))
        schedule = Path(config.batch_dir) / "speculation_schedule.json"
        write_bytes(out / schedule.name, schedule.read_bytes())
    for figure in figures.values():
        write_bytes(out / figure.name, figure.png)
    for name, frame in plot_data(summary, rates).items():
        write_bytes(out / "plots" / name, frame.to_csv(index=False).encode())
    write_bytes(out / "report.md", render_markdown(verdict_[1], sections).encode())
    write_bytes(out / "report.html", render_html(verdict_, sections).encode())
    if provenance is not None:
        write_bytes(out / "provenance.json", json.dumps(provenance, indent=2).encode())
    metrics = dvc_metrics(summary)
    if batch is not None:
        metrics["batch"] = batch_metrics(batch[0])
    write_bytes(out / "metrics.json", json.dumps(metrics, indent=2).encode())
    return metrics
