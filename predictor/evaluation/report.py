"""The evaluation report: an HTML page (Jinja2, tables and plots inline), the same content as Markdown for
diffs in git, DVC metrics and plot data, and the provenance of the run.

Its first lines answer one question with numbers: does the predictor make generation faster than the best
fixed gamma, measured in wall-clock time, without changing the output? Both pages are rendered from one list
of sections, so they cannot say different things.
"""

from __future__ import annotations

import base64
import html
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from jinja2 import Environment, FileSystemLoader
from markupsafe import Markup
from speckv.predictor.evaluation.report_plots import (
    acceptance_by_position,
    acceptance_figure,
    cost_figure,
    gamma_figure,
    goodput_figure,
    to_png,
)
from speckv.profiling.atomic import write_bytes
from speckv.profiling.errors import SpeckvError

LIVE_BASES = {
    "best-fixed": "best_fixed",
    "none": "none",
    "threshold:best": "threshold_best",
    "hf-assisted": "hf_assisted",
    "hf-threshold": "hf_threshold",
    "fixed:4": "fixed4",
}
# replay ratios shown per compression and task
BY_TASK_ROLES = ("mlp", "paper", "threshold:tuned", "first-token-oracle", "oracle")
TEMPLATE = "report.html.j2"


@dataclass
class ReportConfig:
    eval_dir: str = "artifacts/eval"  # summary.json, replay.parquet, live.parquet from `speckv evaluate`
    predictor_dir: str = "artifacts/predictor"  # metrics.json, importance.md, reliability.png, importance.png
    calibrate_dir: str = "artifacts/calibrate"  # cost models, plotted
    out_dir: str = "artifacts/report"  # report.md, report.html, metrics.json, provenance.json, *.png, plots/


@dataclass
class Cell:
    text: str
    tone: str = (
        ""  # "up": interval above the reference (1x, 0%), "down": below it, "": spans it or no interval
    )


@dataclass
class Table:
    columns: list[str]
    rows: list[list[Cell]]
    caption: str = ""


@dataclass
class Figure:
    name: str  # file name under out_dir
    title: str
    png: bytes


@dataclass
class Section:
    """A heading and its blocks, in order: paragraphs (str, `code` and **bold** allowed), bullet lists
    (list[str]), tables and figures."""

    title: str
    blocks: list[str | list[str] | Table | Figure] = field(default_factory=list)
    anchor: str = ""


def _tone(low: float, high: float, reference: float) -> str:
    return "up" if low > reference else "down" if high < reference else ""


def _ci(entry: dict | None) -> str:
    if not entry:
        return "n/a"
    return f"{entry['ratio']:.3f}× [{entry['low']:.3f}, {entry['high']:.3f}]"


def ratio_cell(entry: dict | None) -> Cell:
    """A tokens/s ratio with its CI, green when the CI lies above 1, red when below."""
    return Cell(_ci(entry), _tone(entry["low"], entry["high"], 1.0) if entry else "")


def share_cell(entry: dict | None) -> Cell:
    """A gap share with its CI in percent ({estimate|share, low, high}), green above 0, red below."""
    if not entry:
        return Cell("n/a")
    point = entry.get("estimate", entry.get("share"))
    if point is None or not np.isfinite(point):
        return Cell("n/a")
    text = f"{100 * point:.0f}% [{100 * entry['low']:.0f}%, {100 * entry['high']:.0f}%]"
    return Cell(text, _tone(entry["low"], entry["high"], 0.0))


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


def gap_shares(summary: dict) -> dict[str, dict[str, dict]]:
    """policy -> group -> {estimate, low, high}: `replay.gap_share`, or the older MLP-only `oracle_gap_share`."""
    replay = summary["replay"]
    if "gap_share" in replay:
        return replay["gap_share"]
    if "oracle_gap_share" in replay:
        return {"mlp": {"all": replay["oracle_gap_share"]}}
    return {}


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
    share = gap_shares(summary).get("mlp", {}).get("all")
    if share:
        metrics["replay"]["oracle_gap_share"] = share.get("estimate", share.get("share"))
    test = summary["replay"]["test"]["vs_best_fixed"]["all"]
    for role in ("mlp", "oracle"):
        if role in test:
            metrics["replay"][f"speedup_{role}_vs_best_fixed"] = test[role]["vs_best-fixed"]["ratio"]
    metrics["promotion"] = {"promoted": summary["promotion"]["promoted"]}
    return metrics


def verdict(summary: dict) -> tuple[str, str]:
    """(tone, sentence): the answer, from live wall-clock runs when there are any, else from replay."""
    ratios = summary.get("live", {}).get("ratios", {})
    replay_mlp = summary["replay"]["test"]["vs_best_fixed"]["all"].get("mlp", {}).get("vs_best-fixed")
    decisive = ratios.get("mlp_vs_best-fixed") or replay_mlp
    where = "live wall-clock" if "mlp_vs_best-fixed" in ratios else "replay (modelled time)"
    if decisive is None:
        return "", "No MLP results: nothing to conclude."
    if decisive["low"] > 1.0:
        return "up", f"**The predictor pays**: it beats the best fixed gamma ({where}, CI above 1)."
    if decisive["high"] < 1.0:
        return "down", (
            f"**The predictor does not pay**: it is slower than the best fixed gamma ({where}, CI below 1)."
        )
    return "", f"**No evidence that the predictor pays**: vs the best fixed gamma the CI spans 1 ({where})."


def key_numbers(summary: dict) -> Table:
    """The ratios behind the verdict: live wall-clock beside replay where both exist."""
    live = summary.get("live", {}).get("ratios", {})
    replay = summary["replay"]["test"]
    replay_vs_none = replay.get("vs_none_by_task", {}).get("all", {})
    rows = []
    for base in LIVE_BASES:
        live_ci = live.get(f"mlp_vs_{base}")
        if base == "none":
            replay_ci = replay_vs_none.get("mlp", {}).get("vs_none")
        else:
            replay_ci = replay["vs_best_fixed"]["all"].get("mlp", {}).get(f"vs_{base}")
        if live_ci or replay_ci:
            rows.append([Cell(f"MLP vs {base}"), ratio_cell(live_ci), ratio_cell(replay_ci)])
    versus = replay.get("mlp_vs", {}).get("all", {})
    rivals = [r for r in versus if r != "best-fixed"]
    if rivals:  # the strongest rival on test replay: the claim "best causal policy" is tested against it
        rival = min(rivals, key=lambda r: versus[r]["ratio"])
        rows.append(
            [Cell(f"MLP vs its strongest causal rival, {rival}"), Cell("n/a"), ratio_cell(versus[rival])]
        )
    oracle = replay["vs_best_fixed"]["all"].get("oracle", {}).get("vs_best-fixed")
    if oracle:
        rows.append([Cell("Oracle (hindsight-optimal gamma) vs best-fixed"), Cell("n/a"), ratio_cell(oracle)])
    share = gap_shares(summary).get("mlp", {}).get("all")
    if share:
        rows.append([Cell("MLP share of the oracle's gain over best-fixed"), Cell("n/a"), share_cell(share)])
    level = f"{100 * summary['config']['ci_level']:g}% CI"
    return Table(
        ["comparison", f"live wall-clock [{level}]", f"replay, modelled time [{level}]"],
        rows,
        "Tokens/s ratios on test prompts",
    )


def headline_bullets(summary: dict) -> list[str]:
    live = summary.get("live", {})
    config = summary["config"]
    best = ", ".join(f"{c}: `{t['best-fixed']}`" for c, t in summary["tuned"].items())
    lines = []
    if live.get("ratios"):
        lines.append(
            f"Live on {', '.join(config['live_controllers'])}: test prompts ({config['live_per_task']} per "
            f"task, {config['max_new_tokens']} new tokens), wall-clock tokens/s, "
            f"{100 * config['ci_level']:g}% paired bootstrap CI over prompts; best fixed chosen on dev: {best}"
        )
        lossless = "yes" if live.get("lossless") else "**NO**"
        lines.append(f"Lossless (every greedy run of our loop token-identical to `none`): {lossless}")
        hf = "yes" if live.get("hf_matches_none") else "no"
        lines.append(f"transformers assisted generation output identical to `none`: {hf}")
    else:
        lines.append(f"No live runs in this evaluation (replay only); best fixed chosen on dev: {best}")
    no_draft = [c for c, t in summary["tuned"].items() if t["best-fixed"] == "none"]
    if no_draft:
        lines.append(
            f"On {', '.join(no_draft)} the best fixed policy is `none` (no fixed gamma beats the target alone); "
            "the MLP drafts there only when its running first-token acceptance says a draft pays, and probes "
            "once every few idle steps"
        )
    lines.append(f"MLP decision overhead: {summary['overhead']['decision_ms']:.4f} ms per drafted token")
    lines.append(f"Promotion: {summary['promotion']['reason']}")
    return lines


def policy_table(summary: dict, split: str = "test") -> Table:
    """Every replayed policy: tokens/s and ratio to best fixed, overall and per compression."""
    table = summary["replay"][split]["vs_best_fixed"]
    groups = list(table)
    columns = ["policy"] + [c for g in groups for c in (f"{g} tok/s", f"{g} ÷ best fixed")]
    rows = []
    for role in dict.fromkeys(r for g in groups for r in table[g]):
        cells = [Cell(role)]
        for g in groups:
            entry = table[g].get(role)
            cells += [
                Cell(f"{entry['tokens_per_s']:.1f}" if entry else ""),
                ratio_cell(entry.get("vs_best-fixed")) if entry else Cell(""),
            ]
        rows.append(cells)
    return Table(columns, rows)


def group_table(
    table: dict, roles: list[str] | tuple[str, ...], base: str, prefix: str = "", caption: str = ""
) -> Table:
    """Rows: the groups of `table` (`all` and compression[/task]) starting with `prefix`; cells: each role's
    tokens/s ratio to `base` with its CI. With a prefix, rows are named without it."""
    groups = [g for g in table if g.startswith(prefix)] if prefix else list(table)
    roles = [r for r in roles if any(r in table[g] for g in groups)]
    rows = []
    for group in groups:
        rate = table[group].get(base, {}).get("tokens_per_s")
        rows.append(
            [Cell(group.removeprefix(prefix)), Cell(f"{rate:.1f}" if rate else "")]
            + [ratio_cell(table[group].get(r, {}).get(f"vs_{base}")) for r in roles]
        )
    name = "task" if prefix else "group"
    return Table([name, f"{base} tok/s", *(f"{r} ÷ {base}" for r in roles)], rows, caption)


def share_table(
    shares: dict[str, dict[str, dict]], groups: list[str], prefix: str = "", caption: str = ""
) -> Table:
    """Policies as rows, `groups` as columns (named without `prefix`): each policy's share of the oracle gap."""
    rows = [
        [Cell(policy)] + [share_cell(by_group.get(g)) for g in groups]
        for policy, by_group in shares.items()
        if any(g in by_group for g in groups)
    ]
    return Table(["policy", *(g.removeprefix(prefix) for g in groups)], rows, caption)


def _num(value: float) -> str:
    return "–" if not np.isfinite(value) else f"{value:.2f}"


def live_table(live: pd.DataFrame, caption: str = "") -> Table:
    """One row per live policy (of one compression): pooled tokens/s, acceptance, whether the output matched."""
    rows = []
    for policy, runs in live.groupby("policy", sort=False):
        tps = runs["new_tokens"].sum() / runs["wall_s"].sum()
        drafted = runs["drafted"].sum() if "drafted" in runs else 0
        steps = runs["steps"].sum() if "steps" in runs else 0
        acc = runs["accepted"].sum() / drafted if drafted > 0 else np.nan
        per_step = runs["accepted"].sum() / steps if steps > 0 else np.nan
        lossless = bool(runs["matches_none"].all())
        rows.append(
            [
                Cell(str(policy)),
                Cell(str(runs["spec"].iloc[0])),
                Cell(f"{tps:.1f}"),
                Cell(_num(acc)),
                Cell(_num(per_step)),
                Cell("yes" if lossless else "NO", "" if lossless else "down"),
            ]
        )
    return Table(["policy", "spec", "tok/s", "acceptance", "accepted/step", "lossless"], rows, caption)


def pipe_table(markdown: str) -> Table | None:
    """A Table from the first pipe table in Markdown text (the importance comparison), or None."""
    lines = [line.strip() for line in markdown.splitlines() if line.strip().startswith("|")]
    if len(lines) < 2:
        return None
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return Table(cells[0], [[Cell(c) for c in row] for row in cells[2:]])


def compression_section(summary: dict, live: pd.DataFrame, compression: str) -> Section:
    """One compression: what dev tuning chose, test replay per task, gap shares per task, live runs."""
    section = Section(f"{compression}", anchor=f"compression-{compression}")
    tuned = summary["tuned"].get(compression)
    if tuned:
        section.blocks.append(
            f"Chosen on dev: best fixed `{tuned['best-fixed']}`, threshold `{tuned['threshold:tuned']}`, "
            f"entropy `{tuned['entropy:tuned']}`."
        )
    versus = summary["replay"]["test"].get("mlp_vs", {}).get(compression, {})
    if versus:
        section.blocks.append(
            Table(
                ["rival", "MLP ÷ rival"],
                [[Cell(rival), ratio_cell(ci)] for rival, ci in versus.items()],
                "Test replay: the MLP against every causal policy",
            )
        )
    prefix = f"{compression}/"
    by_task = summary["replay"]["test"].get("by_task", {})
    if any(g.startswith(prefix) for g in by_task):
        section.blocks.append(
            group_table(
                by_task, BY_TASK_ROLES, "best-fixed", prefix, "Test replay per task, ratio to best fixed"
            )
        )
    shares = gap_shares(summary)
    groups = sorted({g for by_group in shares.values() for g in by_group if g.startswith(prefix)})
    if groups:
        section.blocks.append(share_table(shares, groups, prefix, "Share of the oracle's gain per task"))
    if not live.empty and (live["compression"].astype(str) == compression).any():
        rows = live[live["compression"].astype(str) == compression]
        section.blocks.append(live_table(rows, "Live wall-clock runs, test prompts"))
        vs_none = summary.get("live", {}).get("vs_none_by_task", {})
        roles = [r for r in dict.fromkeys(rows["policy"]) if r != "none"]
        if any(g.startswith(prefix) for g in vs_none):
            section.blocks.append(
                group_table(vs_none, roles, "none", prefix, "Live per task, tokens/s ratio to `none`")
            )
    return section


def provenance_rows(provenance: dict, summary: dict) -> list[str]:
    """Bullets that tell two reports apart: checkout, params, machine, threads, versions."""
    git, cpu, threads = provenance["git"], provenance["cpu"], provenance["threads"]
    if git["commit"] is None:
        checkout = "not a git checkout"
    elif git["dirty"]:
        changed = git["changed"]
        more = f" and {len(changed) - 5} more" if len(changed) > 5 else ""
        checkout = (
            f"`{git['commit'][:12]}`, **dirty**: {len(changed)} changed ({', '.join(changed[:5])}{more})"
        )
    else:
        checkout = f"`{git['commit'][:12]}`, clean"
    flags = ", ".join(cpu["flags"]) or "none detected"
    versions = ", ".join(f"{k} {v}" for k, v in provenance["versions"].items() if v)
    evaluated = summary["config"].get("threads")
    return [
        f"Commit: {checkout}",
        f"params.yaml sha256: `{provenance['params_sha256'][:16]}`",
        f"CPU: {cpu['model']} ({cpu['machine']}, {cpu['cores']} logical cores); torch capability "
        f"`{cpu['capability']}`, native bf16: {'yes' if cpu['native_bf16'] else 'no'}; flags: {flags}",
        f"GPU: {provenance['cuda'] or 'none'}",
        f"Threads: evaluate.threads {evaluated}; this process: torch {threads['torch_intra_op']} intra-op, "
        f"{threads['torch_inter_op']} inter-op, {threads['usable_cores']} usable cores, "
        + ", ".join(f"{var}={threads[var] or 'unset'}" for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")),
        f"Versions: {versions}",
        f"Platform: {provenance['platform']}",
    ]


def build_sections(
    summary: dict,
    replay: pd.DataFrame,
    live: pd.DataFrame,
    figures: dict[str, Figure],
    predictor_dir: Path,
    provenance: dict | None,
) -> tuple[tuple[str, str], list[Section]]:
    """The verdict (tone, sentence) and the report's sections, in order."""
    tone, sentence = verdict(summary)
    head = Section("Headline", [key_numbers(summary), headline_bullets(summary)], "headline")
    if "goodput.png" in figures:
        head.blocks.append(figures["goodput.png"])
    sections = [head]

    shares = gap_shares(summary)
    if shares:
        groups = ["all"] + sorted({g for by in shares.values() for g in by if g != "all" and "/" not in g})
        sections.append(
            Section(
                "Share of the oracle's gain",
                [
                    "Test replay: how much of the gap between best fixed (0%) and the hindsight-optimal "
                    "oracle (100%) each policy captures; negative is slower than best fixed.",
                    share_table(shares, groups),
                ],
                "gap-share",
            )
        )

    tuned = "; ".join(
        f"{c}: best fixed `{t['best-fixed']}`, threshold `{t['threshold:tuned']}`, entropy `{t['entropy:tuned']}`"
        for c, t in summary["tuned"].items()
    )
    sections.append(
        Section(
            "Replay on test prompts (exact, time from the cost model)",
            [policy_table(summary), f"Tuned on dev per compression: {tuned}"],
            "replay",
        )
    )
    compressions = sorted(replay["compression"].astype(str).unique())
    sections += [compression_section(summary, live, c) for c in compressions]
    if not live.empty:
        roles = [r for r in dict.fromkeys(live["policy"]) if r != "none"]
        sections.append(
            Section(
                "Live wall-clock runs (test prompts)",
                [
                    group_table(
                        summary["live"]["vs_none"],
                        roles,
                        "none",
                        caption="Tokens/s ratio to `none`, all prompts and per compression",
                    )
                ],
                "live",
            )
        )

    predictor = Section("Predictor", anchor="predictor")
    metrics_path = predictor_dir / "metrics.json"
    if metrics_path.is_file():
        models = json.loads(metrics_path.read_text()).get("models", {})
        rows = [
            [Cell(k), Cell(f"{v['roc_auc']:.4f}"), Cell(f"{v['log_loss']:.4f}"), Cell(f"{v['brier']:.4f}")]
            for k, v in models.items()
        ]
        predictor.blocks += [
            Table(["model", "ROC AUC", "log loss", "Brier"], rows, "Test prompts"),
            "The paper's formulation (`paper_step_regression` above: a step's acceptance rate from "
            "aggregates of that step's own draft) needs inputs that exist only after the draft it would "
            "size. The `paper` policy is its closest deployable reading: the same regressor, refitted on "
            "train prompts, fed the previous step's aggregates, choosing gamma at step start.",
        ]
    importance = predictor_dir / "importance.md"
    if importance.is_file():
        table = pipe_table(importance.read_text())
        if table is not None:
            table.caption = "Feature importance beside the paper's ranking"
            predictor.blocks.append(table)
    if predictor.blocks:
        sections.append(predictor)

    plots = [f for name, f in figures.items() if name != "goodput.png"]
    sections.append(Section("Plots", plots, "plots"))
    if provenance is not None:
        sections.append(
            Section("How this report was made", [provenance_rows(provenance, summary)], "provenance")
        )
    return (tone, sentence), sections


TITLE = "SpecKV: does the learned gamma predictor pay?"


def _md_table(table: Table) -> list[str]:
    lines = [f"**{table.caption}**", ""] if table.caption else []
    lines.append("| " + " | ".join(table.columns) + " |")
    lines.append("|---" * len(table.columns) + "|")
    lines += ["| " + " | ".join(c.text for c in row) + " |" for row in table.rows]
    return lines


def render_markdown(verdict_sentence: str, sections: list[Section]) -> str:
    """The report as Markdown: the verdict on line 3, then each section; figures as links to their PNGs."""
    md = [f"# {TITLE}", "", verdict_sentence, ""]
    for section in sections:
        md += [f"## {section.title}", ""]
        for block in section.blocks:
            if isinstance(block, Table):
                md += [*_md_table(block), ""]
            elif isinstance(block, Figure):
                md += [f"![{block.title}]({block.name})", ""]
            elif isinstance(block, list):
                md += [*(f"- {item}" for item in block), ""]
            else:
                md += [block, ""]
    return "\n".join(md).rstrip() + "\n"


def inline_markdown(text: str) -> Markup:
    """`code` and **bold** as HTML, everything else escaped."""
    out = html.escape(text, quote=False)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    out = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)
    return Markup(out)


def render_html(verdict_: tuple[str, str], sections: list[Section]) -> str:
    """The report as one self-contained page: tables as <table>, plots as inline data: URIs (works offline)."""
    env = Environment(
        loader=FileSystemLoader(Path(__file__).parent / "templates"), autoescape=True, trim_blocks=True
    )
    env.filters["md"] = inline_markdown
    env.filters["data_uri"] = lambda png: "data:image/png;base64," + base64.b64encode(png).decode()
    env.tests["table"] = lambda block: isinstance(block, Table)
    env.tests["figure"] = lambda block: isinstance(block, Figure)
    env.tests["bullets"] = lambda block: isinstance(block, list)
    tone, sentence = verdict_
    return env.get_template(TEMPLATE).render(title=TITLE, tone=tone, verdict=sentence, sections=sections)


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
    for figure in figures.values():
        write_bytes(out / figure.name, figure.png)
    for name, frame in plot_data(summary, rates).items():
        write_bytes(out / "plots" / name, frame.to_csv(index=False).encode())
    write_bytes(out / "report.md", render_markdown(verdict_[1], sections).encode())
    write_bytes(out / "report.html", render_html(verdict_, sections).encode())
    if provenance is not None:
        write_bytes(out / "provenance.json", json.dumps(provenance, indent=2).encode())
    metrics = dvc_metrics(summary)
    write_bytes(out / "metrics.json", json.dumps(metrics, indent=2).encode())
    return metrics
