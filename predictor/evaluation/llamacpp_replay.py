"""llama.cpp's draft-simple rule replayed on dense paths, its step costs fitted from its own timed runs, and
the hindsight oracle under them.

The rule (llama.cpp common/speculative.cpp, draft-simple): each step drafts greedily while the draft's top
token, renormalised over its top 10, has probability >= `p_min`, at most `n_max` tokens and no more than the
generation budget leaves (`n_predict` - generated - 1); a draft shorter than `n_min` is dropped. Every
candidate the draft looks at costs one draft forward, the one that failed `p_min` included. The target
accepts the drafted tokens that match its greedy continuation, then adds its own. Greedy output does not
depend on the rule, so one path per prompt (the target's continuation in llama.cpp, the draft's greedy
tokens and top-10 shares at every position of it) replays every setting exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from speckv.profiling.costmodel import CostModel, StepCosts
from speckv.profiling.errors import SpeckvError
from speckv.profiling.llamacpp import Speculation


@dataclass
class EnginePath:
    """One prompt's greedy continuation in the engine and the draft along it."""

    prompt_id: str
    task: str
    split: str
    n_prompt: int
    tokens: list[int]  # the target's greedy continuation (the first one comes from the prefill)
    match: list[int]  # per position: leading drafted tokens equal to the continuation from there
    share: list[list[float]]  # per position and drafted index: the top-10 share of the draft's top token
    n_predict: int  # the generation budget the run was given


@dataclass(frozen=True)
class Step:
    position: int  # cached tokens when the step starts
    forwards: int  # draft forwards (candidates looked at)
    submitted: int  # drafted tokens the target verifies
    accepted: int
    produced: int


def draft_length(setting: Speculation, share: list[float], cap: int) -> tuple[int, int]:
    """(tokens submitted, draft forwards) of one step under `setting`, with at most `cap` tokens allowed."""
    limit = min(setting.n_max, cap)
    if limit <= 0:
        return 0, 0
    drafted = forwards = 0
    while drafted < limit:
        forwards += 1
        if drafted >= len(share) or share[drafted] < setting.p_min:
            break
        drafted += 1
    return (0 if drafted < setting.n_min else drafted), forwards


def replay_steps(setting: Speculation, path: EnginePath) -> list[Step]:
    """The decode steps (after the prefill's token) of `path` under `setting`."""
    steps, i, n_new = [], 1, len(path.tokens)
    while i < n_new:
        cap = path.n_predict - i - 1
        submitted, forwards = draft_length(setting, path.share[i], cap)
        accepted = min(path.match[i], submitted)
        produced = min(accepted + 1, n_new - i)
        steps.append(Step(path.n_prompt + i, forwards, submitted, accepted, produced))
        i += produced
    return steps


def step_ms(costs: StepCosts, step: Step) -> float:
    """A step's modelled ms: the fixed-length step of its submitted tokens plus the extra forwards."""
    extra = (step.forwards - step.submitted) * costs.draft(step.position)
    return costs.step(step.submitted, step.position) + extra


def replay_time(setting: Speculation, path: EnginePath, costs: StepCosts) -> tuple[int, float]:
    """(decode tokens, modelled decode ms) of `path` under `setting` (the draft reads the prompt beside the
    target's prefill, which llama.cpp times apart from decoding)."""
    steps = replay_steps(setting, path)
    return sum(s.produced for s in steps), sum(step_ms(costs, s) for s in steps)


def oracle_time(path: EnginePath, costs: StepCosts) -> tuple[int, float]:
    """The hindsight optimum: at every step the draft length (0 .. the table's top) that minimises the rest of
    the generation's modelled time, knowing how many tokens will be accepted (a lower bound on any rule)."""
    n_new, top = len(path.tokens), len(costs) - 1
    best = np.zeros(n_new + 1)
    for i in range(n_new - 1, 0, -1):
        cap = max(0, min(top, path.n_predict - i - 1))
        position = path.n_prompt + i
        best[i] = min(
            costs.step(s, position) + best[min(n_new, i + min(path.match[i], s) + 1)] for s in range(cap + 1)
        )
    return n_new - 1, float(best[1]) if n_new > 1 else 0.0


def pooled_rate(setting: Speculation, paths: list[EnginePath], costs: StepCosts) -> float:
    """Modelled decode tokens per second over `paths`, pooled."""
    tokens = ms = 0.0
    for path in paths:
        t, m = replay_time(setting, path, costs)
        tokens, ms = tokens + t, ms + m
    return 1e3 * tokens / ms if ms > 0 else 0.0


def choose(grid: list[Speculation], paths: list[EnginePath], costs: StepCosts) -> tuple[Speculation, dict]:
    """The setting of `grid` with the highest modelled rate on `paths` (ties to the earlier), and every rate."""
    if not grid:
        raise SpeckvError("the llama.cpp settings grid is empty")
    rates = {s.name: pooled_rate(s, paths, costs) for s in grid}
    return max(grid, key=lambda s: rates[s.name]), rates


@dataclass(frozen=True)
class TimedRun:
    """One timed run of a fixed setting: its replayed steps and its measured decode ms."""

    steps: list[Step]
    ms: float
    setting: str = ""


def _undisturbed(runs: list[TimedRun]) -> np.ndarray:
    """Per run: whether its ms per step lies within eight median absolute deviations (at least 1% of the
    median) of the runs of the same setting."""
    per_step = np.array([r.ms / max(1, len(r.steps)) for r in runs])
    kept = np.ones(len(runs), dtype=bool)
    for name in {r.setting for r in runs}:
        group = np.array([r.setting == name for r in runs])
        values = per_step[group]
        median = np.median(values)
        spread = max(float(np.median(np.abs(values - median))), 0.01 * median)
        kept[group] = np.abs(values - median) <= 8 * spread
    return kept


def fit_costs(
    runs: list[TimedRun],
    top: int,
    draft_ms: tuple[float, float],
    context: float,
    meta: dict,
) -> CostModel:
    """llama.cpp's step table from timed runs of fixed draft lengths, in the CostModel shape.

    One least-squares fit over all runs: a step submitting s tokens at `position` costs
    a[s] + (b0 + b1 * s) * (position - context), plus (forwards - s) draft forwards at
    draft_ms[0] + draft_ms[1] * (position - context) ms each (measured apart, the draft decoding alone).
    Every coefficient is kept >= 0. A run the machine descheduled (another process took the cores) is left
    out, as calibration does: ms per step beyond eight median absolute deviations of its setting's runs."""
    from scipy.optimize import nnls

    rows, measured = [], []
    for run in runs:
        row = np.zeros(top + 3)
        steps, ms = run.steps, run.ms
        extra = 0.0
        for s in steps:
            if s.submitted > top:
                raise SpeckvError(f"a run submitted {s.submitted} tokens, beyond the table's {top}")
            offset = s.position - context
            row[s.submitted] += 1.0
            row[top + 1] += offset
            row[top + 2] += s.submitted * offset
            extra += (s.forwards - s.submitted) * (draft_ms[0] + draft_ms[1] * offset)
        rows.append(row)
        measured.append(ms - extra)
    design = np.array(rows)
    seen = design[:, : top + 1].sum(axis=0) > 0
    if not seen.all():
        missing = [k for k in range(top + 1) if not seen[k]]
        raise SpeckvError(f"no timed steps submitting {missing} tokens: the fit needs every length 0..{top}")
    y = np.array(measured)
    kept = _undisturbed(runs)
    if not design[kept, : top + 1].sum(axis=0).all():
        kept[:] = True
    solution, _ = nnls(design[kept], y[kept])
    a, b0, b1 = solution[: top + 1], solution[top + 1], solution[top + 2]
    residual = design[kept] @ solution - y[kept]
    fit = {
        "runs": int(kept.sum()),
        "runs_left_out": int((~kept).sum()),
        "rms_residual_ms": float(np.sqrt(np.mean(residual**2))),
    }
    return CostModel(
        compression=meta.get("compression", ""),
        device=meta.get("device", "cpu"),
        context_tokens=float(context),
        step_ms=[float(v) for v in a],
        step_ms_per_token=[float(b0 + b1 * k) for k in range(top + 1)],
        draft_ms=float(draft_ms[0]),
        draft_ms_per_token=float(draft_ms[1]),
        meta={**meta, "fit": fit},
    )
