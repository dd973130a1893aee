"""Exact offline replay of any gamma controller on dense greedy traces, and the hindsight-optimal oracle.

Greedy speculative output does not depend on the gamma policy, so a trace (the target's continuation and,
at every position, the draft's greedy gamma_max tokens with their signals) fixes what every step of every
controller would draft and accept. Time is modelled with the loop's measured cost model: a step drafting g
tokens at context length L costs `StepCosts.step(g, L)`, the draft's first forward also reads every token it
has not seen (its lazy prefill), a step switching between drafting and not pays the measured switch cost,
and the target's prefill opens the run. As in the decode loop, step 0 ends
at the first token: prefill + step 0 is the time to first token, every later step the decode phase. The
oracle minimises the modelled time by dynamic programming over positions (and whether the draft has been
prefilled yet), so no controller can beat it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from speckv.profiling.controllers import Controller, StepContext, draft_budget, submitted
from speckv.profiling.costmodel import StepCosts
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
    model_ms: float = 0.0  # every step, the draft's lazy prefill included; no target prefill
    first_step_ms: float = 0.0  # step 0: it ends at the first token
    first_tokens: int = 0  # tokens step 0 commits
    prefill_ms: float = 0.0  # the target's prefill of the prompt
    trimmed: int = 0  # drafted tokens dropped before the verify

    @property
    def goodput(self) -> float:
        """Modelled tokens per second."""
        return 1000.0 * self.new_tokens / self.model_ms if self.model_ms > 0 else 0.0

    @property
    def decode_ms(self) -> float:
        return self.model_ms - self.first_step_ms

    @property
    def decode_tokens(self) -> int:
        return self.new_tokens - self.first_tokens

    @property
    def ttft_ms(self) -> float:
        return self.prefill_ms + self.first_step_ms

    def add_step(self, gamma: int, accepted: int, produced: int, ms: float) -> None:
        if not self.gammas:
            self.first_step_ms, self.first_tokens = ms, produced
        self.gammas.append(gamma)
        self.accepts.append(accepted)
        self.model_ms += ms


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


def _step_costs(cost: Sequence[float], gamma_max: int) -> StepCosts:
    """`cost` as StepCosts (a plain list: the same cost at every context, nothing for prefills)."""
    if len(cost) - 1 < gamma_max:
        raise SpeckvError(f"the cost model covers gamma 0..{len(cost) - 1}, the replay needs 0..{gamma_max}")
    return cost if isinstance(cost, StepCosts) else StepCosts(cost, 0.0)


def _limit(trace: Trace, max_new_tokens: int | None) -> int:
    if max_new_tokens is None:
        return trace.n_new
    if max_new_tokens < trace.n_new:
        raise SpeckvError(
            f"trace {trace.prompt_id} ({trace.compression}) holds {trace.n_new} tokens, more than the "
            f"max_new_tokens {max_new_tokens} it is said to be generated with"
        )
    return max_new_tokens


def draft_on_trace(
    controller: Controller, trace: Trace, i: int, step: int, prev_gamma: int, prev_accepted: int, limit: int
) -> tuple[int, int]:
    """Step 1 of the step that starts at trace position `i` (the `step`-th), as the decode loop runs it:
    the controller's budget (capped by `limit` tokens) and how many tokens it drafts before it says stop;
    hindsight policies (FirstTokenOracle) first peek at the trace's match length."""
    position = int(trace.position[i])
    ctx = StepContext(
        step=step,
        position=position,
        new_tokens=i,
        prev_gamma=prev_gamma,
        prev_accepted=prev_accepted,
        compression=trace.compression,
        target_top1=float(trace.target_top1[i]),
        target_entropy=float(trace.target_entropy[i]),
        target_recent=float(trace.target_recent[i]),
    )
    peek = getattr(controller, "peek", None)
    if peek is not None:
        peek(int(trace.match_len[i]))
    budget = draft_budget(controller, ctx, trace.gamma_max, limit - i)
    if controller.needs_signals:
        # as in the loop: after each drafted token but the budget's last, ask whether to go on
        for j in range(budget - 1):
            values = trace.signals[i, j]
            signals = TokenSignals(*map(float, values), draft_index=j, position=position + j)
            if not controller.keep_drafting(signals):
                return budget, j + 1
    return budget, budget


def replay(
    controller: Controller, trace: Trace, step_ms: Sequence[float], max_new_tokens: int | None = None
) -> ReplayResult:
    """Run `controller` on `trace` exactly as speculative_generate would, without the models.

    `step_ms` is a profiling.costmodel.StepCosts (a plain list: the same cost at every context): a step
    drafting g tokens at context L costs `step(g, L)`, a trimmed one (drafted k, verified n < k)
    `trimmed(k, n, L)`, the draft's first forward `draft_first` (or `draft_lag`) more, a step switching
    between drafting and not (once the draft has read the prompt) `switched(k, previous k)` more, and
    reading signals what it says (`signal_ms` per drafted token whose signals the loop computes,
    `target_signal_ms` per step). `max_new_tokens` (default: the trace's length) caps drafting as the live
    loop does, at max_new_tokens - new_tokens - 1.
    """
    gamma_max = trace.gamma_max
    costs = _step_costs(step_ms, gamma_max)
    limit = _limit(trace, max_new_tokens)
    result = ReplayResult(new_tokens=trace.n_new)
    prompt_len = int(trace.position[0])
    result.prefill_ms = costs.target_prefill(prompt_len - 1)
    controller.reset()
    i = prev_gamma = prev_accepted = prev_drafted = 0
    draft_cached = 0  # positions the draft has read; the loop fills it lazily, on the first drafted token
    while i < trace.n_new:
        position = int(trace.position[i])
        budget, k = draft_on_trace(controller, trace, i, len(result.gammas), prev_gamma, prev_accepted, limit)
        n = submitted(controller, k)
        accepted = min(int(trace.match_len[i]), n)
        ms = costs.step(k, position) if n == k else costs.trimmed(k, n, position)
        if draft_cached:
            ms += costs.switched(k, prev_drafted)
        if k:
            # the draft's first forward reads every committed token it has not seen: the whole prompt on its
            # first draft, one or two in a steady run (in the step cost), more after steps drafting nothing
            lag = position - draft_cached
            ms += costs.draft_first(position) if draft_cached == 0 else costs.draft_lag(lag)
            draft_cached = position + min(accepted, k - 1)
        # what reading signals adds, as the loop computes them: every drafted token but a budget's last
        if controller.needs_signals and k:
            ms += (k if k < budget else budget - 1) * costs.signal_ms
        if controller.needs_target_signals:
            ms += costs.target_signal_ms
        produced = min(accepted + 1, trace.n_new - i)
        result.add_step(n, accepted, produced, ms)
        result.trimmed += k - n
        controller.observe(n, accepted)
        prev_gamma, prev_accepted, prev_drafted = n, accepted, k
        i += produced
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

    Every controller's run is a path i -> i + min(match_len_i, g) + 1 through the same positions; the
    shortest path over all g (with a second state for "the draft has not read the prompt yet", whose first
    draft pays the prompt's read at its shortest, the first position; the small lag cost after steps
    drafting nothing and the cost of switching between drafting and not are left out: both only lower the
    bound) is a lower bound on any controller's
    modelled time on this trace.
    """
    n, gamma_max = trace.n_new, trace.gamma_max
    costs = _step_costs(step_ms, gamma_max)
    limit = _limit(trace, max_new_tokens)
    prompt_len = int(trace.position[0])
    # best[s][i]: least ms from position i to the end; s = 1 once the draft has read the prompt
    best = np.zeros((2, n + 1))
    choice = np.zeros((2, n), dtype=np.int64)
    for i in range(n - 1, -1, -1):
        position = int(trace.position[i])
        top = max(0, min(gamma_max, limit - i - 1))
        # the prompt read is charged as if at the first position: never more than any policy pays for it
        for started in (1, 0):
            options = []
            for g in range(top + 1):
                nxt = i + min(min(int(trace.match_len[i]), g) + 1, n - i)
                ms = costs.step(g, position) + best[1 if g else started][nxt]
                if g and not started:
                    ms += costs.draft_first(prompt_len)
                options.append(ms)
            choice[started][i] = int(np.argmin(options))
            best[started][i] = options[choice[started][i]]
    result = ReplayResult(new_tokens=n)
    result.prefill_ms = costs.target_prefill(int(trace.position[0]) - 1)
    i = started = 0
    while i < n:
        g = int(choice[started][i])
        position = int(trace.position[i])
        accepted = min(int(trace.match_len[i]), g)
        ms = costs.step(g, position)
        if g and not started:
            ms += costs.draft_first(prompt_len)
            started = 1
        produced = min(accepted + 1, n - i)
        result.add_step(g, accepted, produced, ms)
        i += produced
    return result
