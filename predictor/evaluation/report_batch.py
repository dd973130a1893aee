"""The report's "Gamma by batch size" section, from `speckv batch`'s outputs (predictor/evaluation/batch_eval.py):
the best fixed gamma per batch size and compression, the replayed and live tokens/s of the compared policies,
replay's error against the live batches, the batched cost models as a plot, and the DVC metrics of it all.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from speckv.predictor.evaluation.report_tables import Cell, Figure, Section, Table, ratio_cell
from speckv.profiling.errors import SpeckvError

# the policies of batch_eval's summary (named there; the report reads the summary without the decode loop)
NONE, BEST, BEST_AT_1, MLP = "none", "best-fixed", "batch-1-best", "mlp"
REPLAYED = (NONE, BEST, BEST_AT_1, MLP)


def load_batch(batch_dir: str | Path) -> tuple[dict, dict[str, dict]] | None:
    """`speckv batch`'s summary and each compression's batched cost model, or None where it has not run."""
    batch_dir = Path(batch_dir)
    path = batch_dir / "summary.json"
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text())
        costs = {
            c: json.loads((batch_dir / f"{c}_batch.json").read_text())["models"]
            for c in summary["compressions"]
        }
    except (OSError, KeyError, json.JSONDecodeError) as exc:
        raise SpeckvError(f"batch outputs in {batch_dir} are missing or corrupt: {exc}") from exc
    return summary, costs


def _sizes(section: dict) -> list[str]:
    return sorted(section["by_batch_size"], key=int)


def replay_table(summary: dict) -> Table:
    """Per compression and batch size: the dev-chosen best gamma, the MLP's share exponent and every compared
    policy's replayed test tokens/s as a ratio to `none`."""
    rows = []
    for compression, section in summary["compressions"].items():
        for b in _sizes(section):
            entry = section["by_batch_size"][b]
            rates = entry["test_rates"]
            rows.append(
                [Cell(compression), Cell(b), Cell(str(entry["best_gamma"])), Cell(f"{rates[NONE]:.1f}")]
                + [Cell(f"{rates[p] / rates[NONE]:.3f}") for p in REPLAYED[1:]]
                + [Cell(f"{entry['mlp_share_exponent']:g}")]
            )
    return Table(
        ["compression", "batch", "best gamma (dev)", "none tok/s", "best ÷ none", "batch-1 best ÷ none"]
        + ["mlp ÷ none", "mlp share exponent"],
        rows,
        "Replay on test prompts, batched cost models (tokens/s summed over the batch)",
    )


def speedup_error(entry: dict, policy: str, clock: str = "replay") -> float:
    """Replay's speedup of `policy` over `none` against the live one, minus 1 (live batch size `entry`),
    under the live runs' clock (`replay`) or the calibration's (`tuning_model`)."""
    replay = entry[policy][f"{clock}_tokens_per_s"] / entry[NONE][f"{clock}_tokens_per_s"]
    live = entry[policy]["measured_tokens_per_s"] / entry[NONE]["measured_tokens_per_s"]
    return replay / live - 1.0


def _errors(entry: dict, clock: str) -> Cell:
    """Replay's largest error on tok/s and on the speedup over `none` at one live batch size."""
    if any(f"{clock}_tokens_per_s" not in e for e in entry.values()):
        return Cell("–")
    worst = max(abs(e[f"{clock}_tokens_per_s"] / e["measured_tokens_per_s"] - 1) for e in entry.values())
    worst_ratio = max(abs(speedup_error(entry, p, clock)) for p in entry if p != NONE)
    return Cell(f"{100 * worst:.1f}% / {100 * worst_ratio:.1f}%")


def _ratio(entry: dict) -> Cell:
    """A live ratio with its CI over batches; one batch has no interval to show."""
    if entry.get("n", 2) < 2:
        return Cell(f"{entry['ratio']:.3f}× (one batch)")
    return ratio_cell(entry)


def live_table(summary: dict) -> Table:
    """Per compression and live batch size: measured tokens/s of `none`, the ratios of the best fixed gamma,
    the MLP and batch 1's best gamma to `none` (paired CIs over batches), replay's largest error under the
    live runs' own clock and under the calibration the choices were made with, and how many batches decoded
    exactly `none`'s tokens."""
    rows = []
    for compression, section in summary["compressions"].items():
        for b, entry in sorted(section["live"].items(), key=lambda kv: int(kv[0])):
            ran = [e for e in entry.values() if e.get("runs_of", BEST_AT_1) == BEST_AT_1]  # no run twice
            lossless = sum(e["lossless_batches"] for e in ran)
            batches = sum(e["batches"] for e in ran)
            rows.append(
                [Cell(compression), Cell(b), Cell(f"{entry[NONE]['measured_tokens_per_s']:.1f}")]
                + [_ratio(entry[p]["vs_none"]) for p in (BEST, MLP, BEST_AT_1)]
                + [_ratio(entry[MLP]["vs_batch_1_best"])]
                + [_errors(entry, "replay"), _errors(entry, "tuning_model")]
                + [Cell(f"{lossless}/{batches}")]
            )
    return Table(
        ["compression", "batch", "none tok/s", "best ÷ none", "mlp ÷ none", "batch-1 best ÷ none"]
        + ["mlp ÷ batch-1 best", "replay error, tok/s / speedup (max)", "under the calibration", "= none"],
        rows,
        "Live batched runs on test prompts (decode tokens/s summed over the batch, 95% CIs over batches)",
    )


def batch_figure(summary: dict, costs: dict[str, dict]) -> plt.Figure:
    """Left: the batched step cost by draft length, relative to the target alone, one line per batch size
    and compression. Right: the best gamma chosen at each batch size."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    styles, ticks = ("-", "--", ":", "-."), []
    for i, (compression, models) in enumerate(costs.items()):
        for j, b in enumerate(
            sorted(models, key=int)
        ):  # a colour per batch size, a line style per compression
            step = models[b]["step_ms"]
            ratios = [t / step[0] for t in step]
            left.plot(range(len(step)), ratios, styles[i % 4], color=f"C{j}", label=f"{compression} B={b}")
        section = summary["compressions"][compression]
        sizes = _sizes(section)
        best = [section["best_gamma"][b] for b in sizes]
        right.plot([int(b) for b in sizes], best, "o" + styles[i % 4], label=compression)
        ticks = [int(b) for b in sizes]
    left.set(xlabel="draft forwards per step (gamma)", ylabel="step ms ÷ step ms at gamma 0")
    left.set_title("Batched step cost (calibrated in the batched loop)")
    left.legend(fontsize=7, ncol=2)
    right.set(xscale="log", xlabel="batch size", ylabel="best fixed gamma (dev replay)")
    right.set_xticks(ticks, [str(b) for b in ticks])
    right.minorticks_off()
    right.yaxis.get_major_locator().set_params(integer=True)
    right.set_title("Gamma by batch size")
    right.legend()
    fig.tight_layout()
    return fig


def batch_section(summary: dict, figure: Figure | None) -> Section:
    config, cpu = summary["config"], summary["cpu"]
    gammas = "; ".join(
        f"{c}: " + ", ".join(f"B={b} → {s['best_gamma'][b]}" for b in _sizes(s))
        for c, s in summary["compressions"].items()
    )
    blocks: list = [
        f"Best fixed gamma by batch size, chosen by batched replay of {config['dev_per_task']} dev prompts per task: "
        f"{gammas}. Measured with SpecKV's batched loop on {cpu['model']} ({cpu['capability']}), "
        f"{config['threads']} threads, {config['max_new_tokens']} tokens per row: `speculation_schedule.json` "
        "beside this report holds it as a vLLM `speculative_config` fragment, which was not measured on vLLM.",
        replay_table(summary),
        live_table(summary),
        "Replay error: the same test batches replayed under the live runs' own clock (the batched "
        "calibration runs of the live batch sizes on dev prompts, taking turns with the live batches), and "
        "under the calibration every choice was made with, minutes earlier (its difference is the machine's "
        "drift). The MLP's stop rule at batch B optimises B's cost table and counts a row's drafted tokens at "
        "B^-exponent of their batch-1 worth (the exponent chosen on dev prompts): a row drafting on lengthens "
        "the step for every row of the batch.",
    ]
    if figure is not None:
        blocks.append(figure)
    return Section("Gamma by batch size", blocks, "batch")


def batch_metrics(summary: dict) -> dict:
    """metrics.json's `batch` entry: best gamma by batch size, live ratios to `none`, replay's largest error."""
    out = {}
    for compression, section in summary["compressions"].items():
        live = {
            b: {p: entry[p]["vs_none"]["ratio"] for p in (BEST, MLP)} for b, entry in section["live"].items()
        }
        ratio_errors = [abs(speedup_error(e, p)) for e in section["live"].values() for p in e if p != NONE]
        out[compression] = {
            "best_gamma": section["best_gamma"],
            "live_vs_none": live,
            "fidelity_max_abs_error": section["fidelity_max_abs_error"],
            "fidelity_ratio_max_abs_error": max(ratio_errors, default=0.0),
        }
        if "tuning_model_max_abs_error" in section:
            out[compression]["tuning_model_max_abs_error"] = section["tuning_model_max_abs_error"]
    return out
