"""The report's building blocks: cells, tables, figures and sections, and the tables made from the
evaluation summary and the live runs. Both renderings (`report_render`) draw on these and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd


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


def gap_shares(summary: dict) -> dict[str, dict[str, dict]]:
    """policy -> group -> {estimate, low, high}: `replay.gap_share`, or the older MLP-only `oracle_gap_share`."""
    replay = summary["replay"]
    if "gap_share" in replay:
        return replay["gap_share"]
    if "oracle_gap_share" in replay:
        return {"mlp": {"all": replay["oracle_gap_share"]}}
    return {}


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
        decode = runs["decode_tokens"].sum() / runs["decode_s"].sum()
        drafted = runs["drafted"].sum() if "drafted" in runs else 0
        steps = runs["steps"].sum() if "steps" in runs else 0
        acc = runs["accepted"].sum() / drafted if drafted > 0 else np.nan
        per_step = runs["accepted"].sum() / steps if steps > 0 else np.nan
        lossless = bool(runs["matches_none"].all())
        rows.append(
            [
                Cell(str(policy)),
                Cell(str(runs["spec"].iloc[0])),
                Cell(f"{decode:.1f}"),
                Cell(f"{tps:.1f}"),
                Cell(f"{runs['ttft_s'].median():.3f}"),
                Cell(_num(acc)),
                Cell(_num(per_step)),
                Cell("yes" if lossless else "NO", "" if lossless else "down"),
            ]
        )
    return Table(
        ["policy", "spec", "decode tok/s", "end-to-end tok/s", "median TTFT s", "acceptance", "accepted/step"]
        + ["lossless"],
        rows,
        caption,
    )


def fidelity_table(fidelity: dict, level: str) -> Table:
    """Replay-predicted against live-measured decode tokens/s and speedup over `none`, per compression and
    live policy; a ratio's cell is green/red only where its CI excludes 1. With a `tuning_model` (the
    calibrate stage's model, when the table's is the one measured beside the live runs) its two ratios too."""
    tuning = {(r["compression"], r["policy"]): r for r in fidelity.get("tuning_model", {}).get("table", [])}
    rows = []
    for r in fidelity["table"]:
        vs_none = (
            ratio_cell({"ratio": r["vs_none_ratio"], "low": r["vs_none_low"], "high": r["vs_none_high"]})
            if "vs_none_ratio" in r
            else Cell("–")
        )
        speedups = (
            f"{r['predicted_vs_none']:.3f} / {r['measured_vs_none']:.3f}"
            if "predicted_vs_none" in r
            else "1 / 1"
        )
        row = [
            Cell(r["compression"]),
            Cell(r["policy"]),
            Cell(f"{r['predicted_tokens_per_s']:.2f} / {r['measured_tokens_per_s']:.2f}"),
            ratio_cell(r),
            Cell(speedups),
            vs_none,
            Cell(f"{r['predicted_ttft_s']:.3f} / {r['measured_ttft_s']:.3f}"),
            Cell(f"{r['same_decisions']:.0%}"),
        ]
        if tuning:
            t = tuning[(r["compression"], r["policy"])]
            row.append(
                Cell(
                    f"{t['ratio']:.3f} / {t['vs_none_ratio']:.3f}"
                    if "vs_none_ratio" in t
                    else f"{t['ratio']:.3f} / –"
                )
            )
        rows.append(row)
    header = [
        "compression",
        "policy",
        "decode tok/s replay / live",
        f"replay ÷ live [{level}]",
        "speedup over none replay / live",
        f"replay ÷ live [{level}]",
        "median TTFT s replay / live",
        "same steps",
    ]
    if tuning:
        header.append("calibrate stage's model: replay ÷ live, tok/s / speedup")
    return Table(
        header,
        rows,
        "Replay against live on the same test prompts and token counts (decode phase: after the first token)",
    )


def pipe_table(markdown: str) -> Table | None:
    """A Table from the first pipe table in Markdown text (the importance comparison), or None."""
    lines = [line.strip() for line in markdown.splitlines() if line.strip().startswith("|")]
    if len(lines) < 2:
        return None
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return Table(cells[0], [[Cell(c) for c in row] for row in cells[2:]])
