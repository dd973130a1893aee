"""Exact offline replay of any gamma controller on dense greedy traces, and the hindsight-optimal oracle.

Greedy speculative output does not depend on the gamma policy, so a trace (the target's continuation and,
at every position, the draft's greedy gamma_max tokens with their signals) fixes what every step of every
controller would draft and accept. Time is modelled with the measured cost model: a step drafting g
tokens costs `CostModel.step_ms(g)`. The oracle minimises that modelled time by dynamic programming over
positions, T[i] = min_g step_ms(g) + T[i + min(match_len_i, g) + 1], so no controller can beat it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from speckv.profiling.controllers import Controller, StepContext, draft_budget, submitted
from speckv.profiling.errors import SpeckvError
from speckv.profiling.schema import read_table
from speckv.profiling.signals import RECENT_TOKENS, SIGNALS, TokenSignals, recent_mean

TRACE_KEYS = ("compression", "task", "split", "prompt_id")
TARGET_COLUMNS = ("target_top1", "target_entropy")


@dataclass
class Trace:
    """One prompt's dense greedy trace at one compression, as arrays indexed by new_index."""

    prompt_id: str
    task: str
    split: str
    compression: str
    match_len: np.ndarray  # (n_new,) leading draft tokens equal to the target's continuation
    position: np.ndarray  # (n_new,) context length at each position
    signals: np.ndarray  # (n_new, gamma_max, len(SIGNALS)) the draft's signals per drafted token
    target_top1: np.ndarray  # (n_new,) the target's confidence in the token before each position
    target_entropy: np.ndarray  # (n_new,) nats

    @property
    def target_recent(self) -> np.ndarray:
        """StepContext.target_recent at each position, as the decode loop's window computes it."""
        return recent_mean(self.target_top1, RECENT_TOKENS)

    @property
    def n_new(self) -> int:
        return len(self.match_len)

    @property
    def gamma_max(self) -> int:
        return self.signals.shape[1]


@dataclass
class ReplayResult:
    """What a controller would have done on a trace: per-step gamma and accepted, modelled time."""

    new_tokens: int
    gammas: list[int] = field(default_factory=list)
    accepts: list[int] = field(default_factory=list)
    model_ms: float = 0.0
    trimmed: int = 0  # drafted tokens dropped before the verify

    @property
    def goodput(self) -> float:
        """Modelled tokens per second."""
        return 1000.0 * self.new_tokens / self.model_ms if self.model_ms > 0 else 0.0


def traces_from_frame(frame: pd.DataFrame) -> list[Trace]:
    """Group TRACE_SCHEMA rows into one Trace per (compression, task, split, prompt), checking density."""
    missing = [
        c
        for c in (*TRACE_KEYS, "new_index", "position", "match_len", "n_new", *SIGNALS, *TARGET_COLUMNS)
        if c not in frame
    ]
    if missing:
        raise SpeckvError(f"trace table lacks columns {missing}")
    traces = []
    for key, rows in frame.groupby(list(TRACE_KEYS), sort=True, observed=True):
        rows = rows.sort_values("new_index")
        n_new = int(rows["n_new"].iloc[0])
        if rows["new_index"].tolist() != list(range(n_new)):
            raise SpeckvError(f"trace {'/'.join(map(str, key))} is not dense: positions missing or repeated")
        width = max(len(v) for v in rows[SIGNALS[0]])
        signals = np.full((n_new, width, len(SIGNALS)), np.nan)
        for s, name in enumerate(SIGNALS):
            for i, values in enumerate(rows[name]):
                signals[i, : len(values), s] = values
        traces.append(
            Trace(
                prompt_id=str(key[3]),
                task=str(key[1]),
                split=str(key[2]),
                compression=str(key[0]),
                match_len=rows["match_len"].to_numpy(np.int64),
                position=rows["position"].to_numpy(np.int64),
                signals=signals,
                target_top1=rows["target_top1"].to_numpy(np.float64),
                target_entropy=rows["target_entropy"].to_numpy(np.float64),
            )
        )
    return traces


def load_traces(path: str | Path) -> list[Trace]:
    """Every trace under a hive-partitioned trace directory (compression=/task=)."""
    frame = read_table(Path(path), "traces").to_pandas()
    if frame.empty:
        raise SpeckvError(f"trace table at {path} holds no rows (run `speckv profile`)")
    for key in ("compression", "task"):
        frame[key] = frame[key].astype(str)
    return traces_from_frame(frame)


def _step_costs(cost: Sequence[float], gamma_max: int) -> Sequence[float]:
    if len(cost) - 1 < gamma_max:
        raise SpeckvError(f"the cost model covers gamma 0..{len(cost) - 1}, the replay needs 0..{gamma_max}")
    return cost


def _limit(trace: Trace, max_new_tokens: int | None) -> int:
    if max_new_tokens is None:
        return trace.n_new
    if max_new_tokens < trace.n_new:
        raise SpeckvError(
            f"trace {trace.prompt_id} ({trace.compression}) holds {trace.n_new} tokens, more than the "
            f"max_new_tokens {max_new_tokens} it is said to be generated with"
        )
    return max_new_tokens


def replay(
    controller: Controller, trace: Trace, step_ms: Sequence[float], max_new_tokens: int | None = None
) -> ReplayResult:
    """Run `controller` on `trace` exactly as speculative_generate would, without the models.

    `step_ms[g]` is the modelled time of a step drafting g tokens; a trimmed step (drafted k, verified
    n < k) costs `step_ms.trimmed(k, n)` (a profiling.costmodel.StepCosts), and reading signals costs what
    the StepCosts says (`signal_ms` per drafted token whose signals the loop computes, `target_signal_ms`
    per step). `max_new_tokens` (default: the
    trace's length) caps drafting as the live loop does, at max_new_tokens - new_tokens - 1.
    """
    gamma_max = trace.gamma_max
    _step_costs(step_ms, gamma_max)
    limit = _limit(trace, max_new_tokens)
    result = ReplayResult(new_tokens=trace.n_new)
    controller.reset()
    peek = getattr(controller, "peek", None)  # only hindsight policies (FirstTokenOracle) have it
    recent = trace.target_recent
    i = prev_gamma = prev_accepted = 0
    while i < trace.n_new:
        ctx = StepContext(
            step=len(result.gammas),
            position=int(trace.position[i]),
            new_tokens=i,
            prev_gamma=prev_gamma,
            prev_accepted=prev_accepted,
            compression=trace.compression,
            target_top1=float(trace.target_top1[i]),
            target_entropy=float(trace.target_entropy[i]),
            target_recent=float(recent[i]),
        )
        if peek is not None:
            peek(int(trace.match_len[i]))
        budget = draft_budget(controller, ctx, gamma_max, limit - i)
        k = budget
        if controller.needs_signals:
            # as in the loop: after each drafted token but the budget's last, ask whether to go on
            for j in range(budget - 1):
                values = trace.signals[i, j]
                signals = TokenSignals(
                    *map(float, values), draft_index=j, position=int(trace.position[i]) + j
                )
                if not controller.keep_drafting(signals):
                    k = j + 1
                    break
        n = submitted(controller, k)
        accepted = min(int(trace.match_len[i]), n)
        result.gammas.append(n)
        result.accepts.append(accepted)
        result.model_ms += step_ms[k] if n == k else step_ms.trimmed(k, n)
        # what reading signals adds, as the loop computes them: every drafted token but a budget's last
        if controller.needs_signals and k:
            result.model_ms += (k if k < budget else budget - 1) * getattr(step_ms, "signal_ms", 0.0)
        if controller.needs_target_signals:
            result.model_ms += getattr(step_ms, "target_signal_ms", 0.0)
        result.trimmed += k - n
        controller.observe(n, accepted)
        prev_gamma, prev_accepted = n, accepted
        i += min(accepted + 1, trace.n_new - i)
    return result


class FirstTokenOracle:
    """Hindsight at step start only: told whether the first drafted token will be accepted, it drafts
    nothing when it will not, and otherwise lets `inner` (the dev-tuned threshold) decide. Replay only: it
    shows how much of the oracle's gap lives in the draft-or-not decision."""

    name = "first-token-oracle"

    def __init__(self, inner: Controller) -> None:
        self.inner = inner
        self.needs_signals = inner.needs_signals
        self.needs_target_signals = False
        self._first_accepted = True

    def peek(self, match_len: int) -> None:
        self._first_accepted = match_len > 0

    def reset(self) -> None:
        self.inner.reset()

    def start_step(self, ctx: StepContext) -> int:
        budget = self.inner.start_step(ctx)
        return budget if self._first_accepted else 0

    def keep_drafting(self, signals: TokenSignals) -> bool:
        return self.inner.keep_drafting(signals)

    def submit(self, drafted: int) -> int:
        return self.inner.submit(drafted)

    def observe(self, drafted: int, accepted: int) -> None:
        self.inner.observe(drafted, accepted)


def oracle(trace: Trace, step_ms: Sequence[float], max_new_tokens: int | None = None) -> ReplayResult:
    """The hindsight-optimal gamma at every step: least modelled time to produce the whole continuation.

    Every controller's run is a path i -> i + min(match_len_i, g) + 1 through the same positions, so the
    shortest path over all g is a lower bound on any controller's modelled time on this trace.
    """
    n, gamma_max = trace.n_new, trace.gamma_max
    _step_costs(step_ms, gamma_max)
    limit = _limit(trace, max_new_tokens)
    best_ms = np.zeros(n + 1)
    best_gamma = np.zeros(n, dtype=np.int64)
    for i in range(n - 1, -1, -1):
        choices = [
            step_ms[g] + best_ms[i + min(min(int(trace.match_len[i]), g) + 1, n - i)]
            for g in range(max(0, min(gamma_max, limit - i - 1)) + 1)
        ]
        best_gamma[i] = int(np.argmin(choices))
        best_ms[i] = choices[best_gamma[i]]
    result = ReplayResult(new_tokens=n)
    i = 0
    while i < n:
        g = int(best_gamma[i])
        accepted = min(int(trace.match_len[i]), g)
        result.gammas.append(g)
        result.accepts.append(accepted)
        result.model_ms += step_ms[g]
        i += min(accepted + 1, n - i)
    return result
