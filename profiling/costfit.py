"""Fit the cost model to the decode loop's own timed steps (profiling/calibrate.py measures them).

A decode step drafting g tokens costs a level per g plus one context slope shared by every g; the draft's
per-token cost is a line in the context; the prefills are lines in the prompt length; a step that switches
between drafting and not (an idle step after a drafting one, a drafting step after an idle one) pays a
measured extra on top of its level, fitted from runs that alternate the two; and reading signals costs what
the same alternating schedule costs beyond that when it reads every signal a signal-driven controller reads.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from speckv.profiling.errors import SpeckvError

# the calibration run that takes turns between drafting and not (calibrate.Alternating): its steps give the
# switch costs and nothing else
ALTERNATE = "alternate"
# the same schedule reading every drafted token's signals (but a budget's last) and the target's confidence at
# every step, as signal-driven controllers make the loop do: its steps give what reading signals costs
ALTERNATE_READING = "alternate+signals"


def monotone(values: list[float]) -> list[float]:
    """The closest non-decreasing sequence (pool adjacent violators, least squares).

    Verifying more tokens never costs less; medians that say otherwise are timing noise, and a replay or a
    stop rule fed with them would prefer a longer draft for no reason.
    """
    blocks: list[list[float]] = []  # [mean, weight]
    for v in values:
        blocks.append([v, 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m2, w2), (m1, w1) = blocks.pop(), blocks.pop()
            blocks.append([(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2])
    return [m for m, w in blocks for _ in range(int(w))]


def robust_line(x, y) -> tuple[float, float]:
    """(intercept, slope) of a least-squares line through (x, y), refitted once without the points more than
    four median absolute deviations off the first fit (a descheduled step is an outlier, not a cost).
    A single x gives slope 0 at the median."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) == 0:
        raise SpeckvError("no timings to fit")
    if np.ptp(x) == 0:
        return float(np.median(y)), 0.0
    slope, intercept = np.polyfit(x, y, 1)
    residual = y - (intercept + slope * x)
    mad = float(np.median(np.abs(residual - np.median(residual))))
    keep = np.abs(residual) <= 4 * max(mad, 1e-9)
    if keep.sum() >= 2 and np.ptp(x[keep]) > 0:
        slope, intercept = np.polyfit(x[keep], y[keep], 1)
    return float(intercept), float(slope)


def pooled_slope(steps: pd.DataFrame) -> float:
    """ms per context token shared by every gamma: the least-squares slope of the steps' time on their
    context length within each gamma, refitted once without the steps more than four median absolute
    deviations off the first fit; never negative.

    One slope for all gammas, not one per gamma: a few calibration prompts give each gamma a handful of
    contexts, and per-gamma slopes swung with the load during each run (leave-one-prompt-out error of the
    mean step on the calibration's own prompts: int8 8.4% -> 6.2%, nf4 17.9% -> 10.5%, fp32 13.6% -> 14.0%).
    """
    kept = steps
    slope = 0.0
    for _ in range(2):
        by_gamma = kept.groupby("gamma")
        x = kept["position"] - by_gamma["position"].transform("mean")
        y = kept["step_ms"] - by_gamma["step_ms"].transform("mean")
        denominator = float((x**2).sum())
        slope = float((x * y).sum()) / denominator if denominator > 0 else 0.0
        residual = y - slope * x
        mad = float(np.median(np.abs(residual - np.median(residual))))
        kept = kept[(np.abs(residual) <= 4 * max(mad, 1e-9)).to_numpy()]
    return max(slope, 0.0)


def stalled(ms: np.ndarray) -> np.ndarray:
    """Steps the process spent descheduled: more than eight median absolute deviations above the median.

    On a shared machine a step now and then takes 10-50x its time (another job took the core); one such
    step moves a gamma's mean by more than the differences between gammas. Slower stretches of load stay in:
    they are what a run pays."""
    median = float(np.median(ms))
    mad = float(np.median(np.abs(ms - median)))
    return ms > median + 8 * max(mad, 1e-3 * median)


def fit_cost_model(
    steps: pd.DataFrame, runs: pd.DataFrame, gamma_max: int, signals: tuple[float, float] = (0.0, 0.0)
) -> dict:
    """The loop's cost model from its own timed steps: every decode step (step 0 belongs to the time to
    first token) is a gamma's level plus a context slope shared by all gammas (`pooled_slope`); a level is
    the mean step as a run pays it (`stalled` steps left out), made non-decreasing in gamma. The draft's
    per-token cost is a line in the context; the target's and the draft's prefill are lines in the prompt
    length. Steps of `ALTERNATE` runs (if any) give only the switch costs (`switch_costs`), those of
    `ALTERNATE_READING` runs only what reading signals costs (`signal_costs`); without them the signal costs
    are `signals` (signal_ms, target_signal_ms), e.g. an isolated measurement."""
    every = steps[steps["step"] > 0]
    kind = every["controller"] if "controller" in every else pd.Series("", index=every.index)
    switching, reading = every[kind == ALTERNATE], every[kind == ALTERNATE_READING]
    decode = every[(kind != ALTERNATE) & (kind != ALTERNATE_READING)]
    lo, hi = float(decode["position"].min()), float(decode["position"].max())
    reference = float(decode["position"].mean())
    counts = decode["gamma"].value_counts()
    short = [g for g in range(gamma_max + 1) if counts.get(g, 0) < 3]
    if short:
        raise SpeckvError(
            f"calibration has fewer than 3 decode steps drafting {short} (a run drafts at most max_new_tokens "
            "- new tokens - 1 per step, and a well-matched pair reaches the end in few steps): raise "
            "calibrate.max_new_tokens or calibrate.loop_prompts"
        )
    slope = pooled_slope(decode)
    levels, fit = [], {}
    for gamma in range(gamma_max + 1):
        rows = decode[decode["gamma"] == gamma]
        at_reference = (rows["step_ms"] - slope * (rows["position"] - reference)).to_numpy()
        kept = at_reference[~stalled(at_reference)]
        levels.append(float(np.mean(kept)))
        predicted = levels[-1] + slope * (rows["position"] - reference)
        fit[gamma] = {
            "steps": len(rows),
            "stalled": int(len(rows) - len(kept)),
            "median_abs_error": float(np.median(np.abs(rows["step_ms"] - predicted) / predicted)),
        }
    step_ms = monotone(levels)
    switch_ms, switch_fit = switch_costs(switching, step_ms, slope, reference)
    signal_ms, target_signal_ms, signal_fit = signal_costs(reading, step_ms, slope, reference, switch_ms)
    signal_ms = signals[0] if signal_ms is None else signal_ms
    target_signal_ms = signals[1] if target_signal_ms is None else target_signal_ms

    drafting = decode[decode["gamma"] > 0]
    drafting = drafting[~stalled((drafting["draft_ms"] / drafting["gamma"]).to_numpy())]
    per_token = drafting["draft_ms"] / drafting["gamma"]
    _, draft_slope = robust_line(drafting["position"], per_token)
    draft_slope = max(draft_slope, 0.0)
    draft_ms = float(np.mean(per_token - draft_slope * (drafting["position"] - reference)))

    prefill = robust_line(runs["prompt_tokens"] - 1, runs["prefill_ms"])
    first = runs[runs["first_gamma"] > 0]
    # the draft's first forward reads the whole prompt; the rest of step 0's drafts are ordinary tokens
    own = first["first_draft_ms"] - (first["first_gamma"] - 1) * (
        draft_ms + draft_slope * (first["prompt_tokens"] - reference)
    )
    draft_prefill = robust_line(first["prompt_tokens"], own) if len(first) else (0.0, 0.0)
    return {
        "context_tokens": reference,
        "step_ms": step_ms,
        "step_ms_per_token": [slope] * (gamma_max + 1),
        "draft_ms": draft_ms,
        "draft_ms_per_token": draft_slope,
        "prefill_ms": [max(prefill[0], 0.0), max(prefill[1], 0.0)],
        "draft_prefill_ms": [max(draft_prefill[0], 0.0), max(draft_prefill[1], 0.0)],
        "switch_ms": switch_ms,
        "signal_ms": signal_ms,
        "target_signal_ms": target_signal_ms,
        "fit": {"contexts": [lo, hi], "by_gamma": fit, "switch": switch_fit, "signals": signal_fit},
    }


def _switch_rows(steps: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Masks of the idle steps after a drafting one and of the drafting steps after an idle one."""
    gamma, before = steps["gamma"].to_numpy(), steps["prev_gamma"].to_numpy()
    return (gamma == 0) & (before > 0), (gamma > 0) & (before == 0)


def _excess(
    steps: pd.DataFrame, rows: np.ndarray, step_ms: list[float], slope: float, reference: float
) -> tuple[np.ndarray, np.ndarray]:
    """(ms beyond the fitted level, gamma) of the `rows` of `steps` that were not `stalled`."""
    index = np.flatnonzero(rows)
    gamma = steps["gamma"].to_numpy()[index]
    modelled = np.asarray(step_ms)[gamma] + slope * (steps["position"].to_numpy()[index] - reference)
    measured = steps["step_ms"].to_numpy()[index]
    kept = ~stalled(measured / modelled) if len(index) else np.ones(0, bool)
    return (measured - modelled)[kept], gamma[kept]


def switch_costs(
    steps: pd.DataFrame, step_ms: list[float], slope: float, reference: float
) -> tuple[list[float], dict]:
    """[an idle step after a drafting one, a drafting step after an idle one]: the mean ms such steps of
    `steps` (decode steps of `ALTERNATE` runs, with the previous step's gamma) take beyond the fitted
    levels, `stalled` steps left out; never negative (a switch costs at least nothing: a negative mean is
    noise). No such steps: 0.

    Fixed-gamma runs never switch, so their levels leave this out; a policy that mixes drafting and idle
    steps pays it (docs/fidelity.md has the measurements; a likely cause is the two models' weights
    evicting each other from the CPU caches).
    """
    if steps.empty:
        return [0.0, 0.0], {"steps": [0, 0], "stalled": [0, 0]}
    extras, counts, dropped = [], [], []
    for rows in _switch_rows(steps):
        excess, _ = _excess(steps, rows, step_ms, slope, reference)
        counts.append(int(rows.sum()))
        dropped.append(int(rows.sum()) - len(excess))
        extras.append(max(0.0, float(np.mean(excess))) if len(excess) else 0.0)
    return extras, {"steps": counts, "stalled": dropped}


def signal_costs(
    steps: pd.DataFrame, step_ms: list[float], slope: float, reference: float, switch_ms: list[float]
) -> tuple[float | None, float | None, dict]:
    """(ms per drafted token whose signals the loop reads, ms per step for the target's confidence) from
    the decode steps of `ALTERNATE_READING` runs: what their idle steps take beyond the level and the switch
    cost is the target's confidence; what their drafting steps take beyond that, per token read (every
    drafted token but the budget's last), the draft's signals. Never negative; None without such steps.

    Measured in the loop because there it costs far more than the same calls repeated in isolation
    (docs/fidelity.md)."""
    idle, drafting = _switch_rows(steps) if not steps.empty else (np.zeros(0, bool),) * 2
    if not idle.any() or not drafting.any():
        return None, None, {"steps": [int(idle.sum()), int(drafting.sum())]}
    per_step, _ = _excess(steps, idle, step_ms, slope, reference)
    target_signal_ms = max(0.0, float(np.mean(per_step - switch_ms[0])))
    excess, gamma = _excess(steps, drafting, step_ms, slope, reference)
    reads = (gamma - 1).astype(float)
    residual = excess - switch_ms[1] - target_signal_ms
    signal_ms = max(0.0, float(residual @ reads / (reads @ reads))) if reads.any() else None
    return signal_ms, target_signal_ms, {"steps": [int(idle.sum()), int(drafting.sum())]}
