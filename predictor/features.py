"""The acceptance predictor's input: what is known right after a token is drafted, before the target sees it,
and the step-start model's: what is known before anything is drafted.

One vector per drafted token, in FEATURES order. `table_features` builds it from the profiled token table,
`live_features` from the decode loop's TokenSignals + RunningStats + StepContext; a test holds them equal.
The step's gamma is deliberately absent: it is only known once drafting has stopped.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
from speckv.profiling.errors import SpeckvError
from speckv.profiling.signals import SIGNALS, running_columns

if TYPE_CHECKING:
    import pandas as pd
    from speckv.profiling.controllers import StepContext
    from speckv.profiling.signals import TokenSignals

# Fixed so that a model trained on CPU compressions still accepts a GPU one's vector (and rejects unknowns).
COMPRESSIONS = ("fp32", "fp16", "bf16", "int8", "nf4")
RUNNING = tuple(running_columns())
ONE_HOT = tuple(f"compression={c}" for c in COMPRESSIONS)
# The target's confidence where it chose the last committed token (and over the last few): free with the
# verify pass, known before drafting, and the same whatever gamma policy produced the context. (The previous
# step's gamma and accepted count were dropped: they depend on the policy that ran, so rows from traces
# could not carry them.)
TARGET = ("target_top1", "target_entropy", "target_recent")
CONTEXT = ("draft_index", "log1p_position", *TARGET)
FEATURES = (*SIGNALS, *RUNNING, *CONTEXT, *ONE_HOT)
# The step-start model: what is known before the first token is drafted (draft at all?).
START_FEATURES = (*TARGET, "log1p_position", *ONE_HOT)

# A draft is identified by its run and step; the running aggregates restart at each.
STEP_KEYS = ("prompt_id", "task", "compression", "controller", "mode", "step")

_ONE_HOT = {c: tuple(float(c == other) for other in COMPRESSIONS) for c in COMPRESSIONS}


def compression_one_hot(compression: str) -> tuple[float, ...]:
    try:
        return _ONE_HOT[compression]
    except KeyError:
        raise SpeckvError(f"compression {compression!r} is not one of {list(COMPRESSIONS)}") from None


def running_aggregates(tokens: pd.DataFrame) -> pd.DataFrame:
    """Running min/max/mean of each signal over draft indices 0..i of the same step, as RunningStats does.

    Recomputed from the signal columns (not read from the table) so that a row can only see its own and
    earlier tokens of its draft, whatever the profiler wrote.
    """
    ordered = tokens.sort_values([*STEP_KEYS, "draft_index"], kind="stable")
    by_step = (
        ordered[list(SIGNALS)]
        .astype("float64")
        .groupby([ordered[k] for k in STEP_KEYS], sort=False, observed=True)
    )
    low, high, total = by_step.cummin(), by_step.cummax(), by_step.cumsum()
    count = by_step.cumcount().to_numpy() + 1
    out = {}
    for name in SIGNALS:
        out[f"{name}_min"] = low[name]
        out[f"{name}_max"] = high[name]
        out[f"{name}_mean"] = total[name] / count
    return ordered[[]].assign(**out)[list(RUNNING)].reindex(tokens.index)


def table_features(tokens: pd.DataFrame) -> np.ndarray:
    """The (rows, len(FEATURES)) float64 feature matrix of token-table rows, row order kept."""
    running = running_aggregates(tokens)
    one_hot = np.array([compression_one_hot(c) for c in tokens["compression"].astype(str)], dtype=np.float64)
    columns = [tokens[s].to_numpy(np.float64) for s in SIGNALS]
    columns += [running[c].to_numpy(np.float64) for c in RUNNING]
    columns += [
        tokens["draft_index"].to_numpy(np.float64),
        np.log1p(tokens["position"].to_numpy(np.float64)),
        *(tokens[c].to_numpy(np.float64) for c in TARGET),
    ]
    return np.column_stack([*columns, one_hot.reshape(len(tokens), len(COMPRESSIONS))])


def table_start_features(steps: pd.DataFrame) -> np.ndarray:
    """The (rows, len(START_FEATURES)) matrix of step-start rows (target_* columns, position = step start)."""
    one_hot = np.array([compression_one_hot(c) for c in steps["compression"].astype(str)], dtype=np.float64)
    columns = [steps[c].to_numpy(np.float64) for c in TARGET]
    columns.append(np.log1p(steps["position"].to_numpy(np.float64)))
    return np.column_stack([*columns, one_hot.reshape(len(steps), len(COMPRESSIONS))])


def live_features(
    signals: TokenSignals, running: dict[str, float], ctx: StepContext, out: np.ndarray
) -> np.ndarray:
    """Fill `out` (len(FEATURES),) in place from one drafted token; `running` is RunningStats.update's result.

    Writes into a caller-owned buffer because this runs once per drafted token inside the decode loop.
    """
    out[:] = [
        *[getattr(signals, s) for s in SIGNALS],
        *[running[c] for c in RUNNING],
        signals.draft_index,
        math.log1p(signals.position),
        ctx.target_top1,
        ctx.target_entropy,
        ctx.target_recent,
        *compression_one_hot(ctx.compression),
    ]
    return out


def live_start_features(ctx: StepContext, out: np.ndarray) -> np.ndarray:
    """Fill `out` (len(START_FEATURES),) at step start, before anything is drafted."""
    out[:] = [
        ctx.target_top1,
        ctx.target_entropy,
        ctx.target_recent,
        math.log1p(ctx.position),
        *compression_one_hot(ctx.compression),
    ]
    return out
