"""Exact offline replay of gamma controllers on a batch of dense greedy traces: speculative_generate_batch
without the models, as `replay` is speculative_generate without them.

A step mirrors the batched loop (batch_decode.py):
  1. every active row asks its own controller for a budget (`draft_budget`, capped by its own tokens left)
     and drafts until its budget is spent or its controller's `keep_drafting` says stop; the batch runs as
     many draft forwards as the longest row drafted;
  2. each row trims what it drafted (`submitted`); one target verify covers the batch;
  3. each row accepts min(match_len, submitted) and commits accepted + 1 tokens;
  4. rows that reach the end of their trace leave the batch, so later steps run fewer rows.
Greedy output does not depend on the batch, so every row decides and advances exactly as `replay` makes it
on its trace alone; only the time is the batch's. A step costs `step_ms(batch_size, gamma, position)`: the
rows active, gamma = the draft forwards the step ran (the most tokens any row drafted, trimmed ones
included: each forward is a sequential pass over the batch, and the verify is at most one token wider), and
the context of the longest active row (every row's attention reads the cache that far). That callable
covers the whole step (drafting, verify, signals); the prefills are not modelled.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from speckv.profiling.controllers import Controller, submitted
from speckv.profiling.errors import SpeckvError
from speckv.profiling.replay import ReplayResult, Trace, _limit, draft_on_trace

__all__ = [
    "BatchReplayResult",
    "RowReplay",
    "batch_goodput",
    "compose_batches",
    "replay_batch",
    "replay_totals",
]

StepMs = Callable[[int, int, float], float]  # (batch_size, gamma, longest row position) -> ms of a step


@dataclass
class RowReplay(ReplayResult):
    """One row of a batch replay: ReplayResult's per-step submitted `gammas` and `accepts`, and what the row
    drafted before any trim. Its model_ms sums the batch steps it took part in (a row's step lasts as long
    as the batch's), so its `goodput` is that row's own rate."""

    prompt_id: str = ""
    drafted: list[int] = field(default_factory=list)  # per step: tokens the row drafted, before any trim

    @property
    def accepted_tokens(self) -> int:
        return sum(self.accepts)

    @property
    def drafted_tokens(self) -> int:
        """Tokens drafted, trimmed ones included (each cost a draft forward)."""
        return sum(self.drafted)

    @property
    def acceptance_rate(self) -> float:
        """Accepted over verified tokens, as GenerationResult.acceptance_rate."""
        verified = sum(self.gammas)
        return self.accepted_tokens / verified if verified else 0.0


@dataclass
class BatchReplayResult:
    """Each row's replay and the batch's per-step record. Steps chain without gaps: wall_ms = sum(step_ms)."""

    rows: list[RowReplay]  # one per trace, in the order given
    batch_sizes: list[int] = field(default_factory=list)  # per step: rows decoding
    gammas: list[int] = field(default_factory=list)  # per step: draft forwards (most tokens a row drafted)
    # per step: step_ms(batch size, gamma, longest row position)
    step_ms: list[float] = field(default_factory=list)

    @property
    def steps(self) -> int:
        return len(self.step_ms)

    @property
    def new_tokens(self) -> int:
        return sum(row.new_tokens for row in self.rows)

    @property
    def wall_ms(self) -> float:
        return float(sum(self.step_ms))

    @property
    def decode_ms(self) -> float:
        """Modelled time after the first step, which commits every row's first tokens."""
        return float(sum(self.step_ms[1:]))

    @property
    def decode_tokens(self) -> int:
        """Tokens committed after the first step, over all rows."""
        return sum(row.decode_tokens for row in self.rows)

    @property
    def decode_tokens_per_s(self) -> float:
        """The batch's modelled decode throughput: tokens of every row per second of decode time."""
        return 1000.0 * self.decode_tokens / self.decode_ms if self.decode_ms > 0 else 0.0

    @property
    def acceptance_rate(self) -> float:
        verified = sum(sum(row.gammas) for row in self.rows)
        return sum(row.accepted_tokens for row in self.rows) / verified if verified else 0.0


@dataclass
class _Row:
    """One trace's replay state while it is in the batch."""

    trace: Trace
    controller: Controller
    limit: int  # max_new_tokens the trace was generated with
    result: RowReplay
    i: int = 0  # tokens committed so far (the trace position the next step starts at)

    @property
    def position(self) -> int:
        return int(self.trace.position[self.i])


def _one_compression(traces: list[Trace]) -> str:
    """The batch's compression; one clear error when there are no traces or they mix compressions."""
    if not traces:
        raise SpeckvError("no traces to replay: give at least one")
    compressions = sorted({t.compression for t in traces})
    if len(compressions) > 1:
        raise SpeckvError(
            f"traces of compressions {compressions} in one batch: a batch decodes with one target, so "
            "batch each compression's traces apart"
        )
    return compressions[0]


def _check(controllers: list[Controller], traces: list[Trace]) -> None:
    _one_compression(traces)
    if len(controllers) != len(traces):
        raise SpeckvError(f"{len(controllers)} controllers for {len(traces)} traces: give one per trace")
    if len({id(c) for c in controllers}) != len(controllers):
        raise SpeckvError("each trace needs its own controller object (controllers keep per-sequence state)")


def _draft(row: _Row) -> int:
    """Step 1 for one row, as `replay` runs it: how many tokens it drafts."""
    gammas, accepts = row.result.gammas, row.result.accepts
    prev_gamma, prev_accepted = (gammas[-1], accepts[-1]) if gammas else (0, 0)
    return draft_on_trace(
        row.controller, row.trace, row.i, len(gammas), prev_gamma, prev_accepted, row.limit
    )[1]


def _commit(row: _Row, drafted: int, ms: float) -> None:
    """Steps 2-4 for one row: trim, accept against the trace, commit, tell the controller."""
    n = submitted(row.controller, drafted)
    accepted = min(int(row.trace.match_len[row.i]), n)
    produced = min(accepted + 1, row.trace.n_new - row.i)
    row.result.add_step(n, accepted, produced, ms)
    row.result.drafted.append(drafted)
    row.result.trimmed += drafted - n
    row.controller.observe(n, accepted)
    row.i += produced


def replay_batch(
    controllers: list[Controller], traces: list[Trace], step_ms: StepMs, max_new_tokens: int | None = None
) -> BatchReplayResult:
    """Run `controllers[b]` on `traces[b]` for every b as one batch, as speculative_generate_batch would.

    `controllers` holds one object per trace (they keep per-sequence state); the traces share one
    compression. `step_ms(batch_size, gamma, position)` is the modelled ms of one batched step (see the
    module docstring). `max_new_tokens` (default: each trace's length) caps drafting as the live loop does,
    at max_new_tokens - new_tokens - 1 per row.
    """
    _check(controllers, traces)
    rows = []
    for trace, controller in zip(traces, controllers, strict=True):
        controller.reset()
        rows.append(
            _Row(
                trace=trace,
                controller=controller,
                limit=_limit(trace, max_new_tokens),
                result=RowReplay(new_tokens=trace.n_new, prompt_id=trace.prompt_id),
            )
        )
    out = BatchReplayResult(rows=[row.result for row in rows])
    active = [row for row in rows if row.trace.n_new > 0]
    while active:
        drafted = [_draft(row) for row in active]
        gamma = max(drafted)
        position = float(max(row.position for row in active))
        ms = float(step_ms(len(active), gamma, position))
        for row, k in zip(active, drafted, strict=True):
            _commit(row, k, ms)
        out.batch_sizes.append(len(active))
        out.gammas.append(gamma)
        out.step_ms.append(ms)
        active = [row for row in active if row.i < row.trace.n_new]
    return out


def compose_batches(traces: list[Trace], batch_size: int) -> list[list[Trace]]:
    """Consecutive groups of `batch_size` traces in order of prompt_id (a stable sort: ties keep their
    order); the last group holds what is left. The traces share one compression."""
    if batch_size < 1:
        raise SpeckvError(f"batch_size must be >= 1, got {batch_size}")
    _one_compression(traces)
    ordered = sorted(traces, key=lambda t: t.prompt_id)
    return [ordered[start : start + batch_size] for start in range(0, len(ordered), batch_size)]


def replay_totals(
    controller_factory: Callable[[], Controller],
    traces: list[Trace],
    batch_size: int,
    step_ms: StepMs,
    max_new_tokens: int | None = None,
) -> tuple[int, float]:
    """(decode tokens, decode ms) over every batch of `compose_batches(traces, batch_size)`, the batches run
    one after another. `controller_factory()` builds one fresh controller per row."""
    tokens, ms = 0, 0.0
    for batch in compose_batches(traces, batch_size):
        result = replay_batch([controller_factory() for _ in batch], batch, step_ms, max_new_tokens)
        tokens += result.decode_tokens
        ms += result.decode_ms
    return tokens, ms


def batch_goodput(
    controller_factory: Callable[[], Controller],
    traces: list[Trace],
    batch_size: int,
    step_ms: StepMs,
    max_new_tokens: int | None = None,
) -> float:
    """Modelled decode tokens per second over every batch (`replay_totals`), pooled: all rows' decode tokens
    over all batches' decode ms, not a mean of the batches' rates."""
    tokens, ms = replay_totals(controller_factory, traces, batch_size, step_ms, max_new_tokens)
    return 1000.0 * tokens / ms if ms > 0 else 0.0
