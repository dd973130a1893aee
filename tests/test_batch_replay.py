"""replay_batch against replay, rows advancing apart, what a batched step is charged, pooled goodput and bad
input, on small synthetic traces (no models, no torch).

Run alone with `pytest tests/test_batch_replay.py -v`.
"""

from __future__ import annotations

import numpy as np
import pytest
from speckv.profiling.batch_replay import batch_goodput, compose_batches, replay_batch
from speckv.profiling.controllers import FixedGamma, parse_controller
from speckv.profiling.costmodel import StepCosts
from speckv.profiling.errors import SpeckvError
from speckv.profiling.replay import Trace, replay

GAMMA_MAX = 4


def make_trace(
    prompt_id: str,
    match: list[int],
    draft_prob: float = 0.9,
    start: int = 10,
    compression: str = "fp32",
) -> Trace:
    """A trace whose draft matches the target for `match[i]` tokens at position i (capped at the tokens left
    after i's own), every drafted token at `draft_prob`."""
    n = len(match)
    match_len = np.minimum(np.asarray(match, dtype=np.int64), n - 1 - np.arange(n))
    p = np.full((n, GAMMA_MAX), draft_prob)
    signals = np.stack([p, p, p / 2, 3 * (1 - p)], axis=-1)
    top1 = np.full(n, 0.7)
    return Trace(
        prompt_id, "t", "test", compression, match_len, start + np.arange(n), signals, top1, 1 - top1
    )


def random_trace(rng: np.random.Generator, prompt_id: str, n_new: int) -> Trace:
    """Matches and draft probabilities drawn at random, as tests/test_eval_replay.py draws them."""
    match = np.minimum(rng.geometric(1 - rng.uniform(0.1, 0.9), n_new) - 1, GAMMA_MAX)
    match = np.minimum(match, n_new - np.arange(n_new))
    p = rng.uniform(0, 1, (n_new, GAMMA_MAX))
    signals = np.stack([p, p, p / 2, 3 * (1 - p)], axis=-1)
    top1 = rng.uniform(0.2, 1.0, n_new)
    start = int(rng.integers(5, 50))
    return Trace(
        prompt_id, "t", "test", "fp32", match, start + np.arange(n_new), signals, top1, 2 * (1 - top1)
    )


class Recorder:
    """A batched step cost that records what it was asked: dearer with rows, gamma and context."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int, float]] = []

    def __call__(self, batch_size: int, gamma: int, position: float) -> float:
        self.calls.append((batch_size, gamma, position))
        return 100.0 * batch_size + 10.0 * gamma + position / 100


SPECS = ["none", "fixed:1", "fixed:3", "fixed:4", "threshold:0.5", "threshold:0.6+trim", "heuristic"]


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("extra", [None, 3])
def test_a_batch_of_one_is_replay(spec, seed, extra):
    rng = np.random.default_rng(seed)
    trace = random_trace(rng, "p", int(rng.integers(1, 40)))
    max_new = None if extra is None else trace.n_new + extra
    costs = StepCosts(np.cumsum(rng.uniform(1, 10, GAMMA_MAX + 1)), 1.0, context=20.0, slopes=[0.1] * 5)
    alone = replay(parse_controller(spec, GAMMA_MAX), trace, costs, max_new)
    batch = replay_batch(
        [parse_controller(spec, GAMMA_MAX)], [trace], lambda b, g, p: costs.step(g, p), max_new
    )
    (row,) = batch.rows
    assert row.new_tokens == alone.new_tokens == batch.new_tokens == trace.n_new
    assert row.gammas == alone.gammas
    assert row.accepts == alone.accepts
    assert row.trimmed == alone.trimmed
    assert row.first_tokens == alone.first_tokens
    assert batch.batch_sizes == [1] * len(alone.gammas)
    if not spec.endswith("+trim"):
        # nothing trimmed: the step's draft forwards are its gamma, and the costs agree step for step
        assert batch.gammas == alone.gammas == row.drafted
        assert batch.wall_ms == pytest.approx(alone.model_ms)
        assert batch.decode_ms == pytest.approx(alone.decode_ms)
        assert batch.decode_tokens == alone.decode_tokens


@pytest.mark.parametrize("seed", range(4))
def test_each_row_decides_as_it_would_alone(seed):
    """Greedy rows do not see each other: a batch of mixed controllers is each row's own replay."""
    rng = np.random.default_rng(100 + seed)
    specs = ["fixed:2", "threshold:0.4", "none", "entropy:1+trim", "heuristic:2"]
    traces = [random_trace(rng, f"p{b}", int(rng.integers(1, 30))) for b in range(len(specs))]
    batch = replay_batch([parse_controller(s, GAMMA_MAX) for s in specs], traces, Recorder())
    for spec, trace, row in zip(specs, traces, batch.rows, strict=True):
        alone = replay(parse_controller(spec, GAMMA_MAX), trace, [1.0] * (GAMMA_MAX + 1))
        assert (row.gammas, row.accepts, row.new_tokens) == (alone.gammas, alone.accepts, trace.n_new)
    assert batch.new_tokens == sum(t.n_new for t in traces)


def test_rows_advance_apart_and_finished_rows_leave():
    traces = [
        make_trace("a", [GAMMA_MAX] * 8),  # accepts all it drafts: 3 tokens a step
        make_trace("b", [0] * 8),  # accepts nothing: 1 token a step
        make_trace("c", [GAMMA_MAX] * 3),  # done after one step
    ]
    out = replay_batch([FixedGamma(2) for _ in traces], traces, Recorder())
    a, b, c = out.rows
    assert [row.new_tokens for row in out.rows] == [8, 8, 3]
    assert a.gammas == [2, 2, 1] and a.accepts == [2, 2, 1]  # the last step's budget capped by tokens left
    assert b.gammas == [2, 2, 2, 2, 2, 2, 1, 0] and b.accepts == [0] * 8
    assert c.gammas == [2] and c.accepts == [2]
    assert out.batch_sizes == [3, 2, 2, 1, 1, 1, 1, 1]
    assert out.gammas == [2, 2, 2, 2, 2, 2, 1, 0]
    # each row's time is the batch steps it took part in
    assert a.model_ms == pytest.approx(sum(out.step_ms[:3]))
    assert b.model_ms == pytest.approx(out.wall_ms)
    assert c.model_ms == pytest.approx(out.step_ms[0])


def test_the_step_is_charged_at_the_most_tokens_drafted():
    traces = [
        make_trace("a", [GAMMA_MAX] * 12, start=10),
        make_trace("b", [GAMMA_MAX] * 12, start=20),
        make_trace("c", [0] * 6, start=60),
    ]
    cost = Recorder()
    out = replay_batch([FixedGamma(1), FixedGamma(3), parse_controller("none", GAMMA_MAX)], traces, cost)
    assert [call[1] for call in cost.calls] == out.gammas
    assert out.step_ms == [100.0 * b + 10.0 * g + p / 100 for b, g, p in cost.calls]
    for s, (batch_size, gamma, position) in enumerate(cost.calls):
        in_step = [b for b, row in enumerate(out.rows) if len(row.drafted) > s]
        assert batch_size == out.batch_sizes[s] == len(in_step)
        assert gamma == max(out.rows[b].drafted[s] for b in in_step)
        # a row's context: its start and every token it committed (accepted + 1 a step) before step s;
        # the step is charged at the longest active row's (the width every row's attention reads)
        starts = [int(traces[b].position[0]) + s + sum(out.rows[b].accepts[:s]) for b in in_step]
        assert position == max(starts)
    # step 0: every row at its first position; the verify is as wide as row b's 3 tokens, not row a's 1
    assert cost.calls[0] == (3, 3, 60)
    # step 1: a committed 2 tokens, b 4, c 1: c is still the widest
    assert cost.calls[1] == (3, 3, 61)
    # b (4 tokens a step from 20) leaves after step 2; a and c go on, c still the widest
    assert out.batch_sizes[3] == 2 and cost.calls[3][2] == 63


def test_a_row_that_stops_early_drafts_less_than_the_batch():
    traces = [
        make_trace("sure", [GAMMA_MAX] * 10, draft_prob=0.9),
        make_trace("unsure", [0] * 10, draft_prob=0.1),
    ]
    controllers = [
        parse_controller("threshold:0.5", GAMMA_MAX),
        parse_controller("threshold:0.5+trim", GAMMA_MAX),
    ]
    out = replay_batch(controllers, traces, Recorder())
    sure, unsure = out.rows
    assert out.gammas[0] == GAMMA_MAX == sure.drafted[0]
    assert unsure.drafted[0] == 1 < out.gammas[0]  # stopped at its first token: below the threshold
    # +trim drops it unverified, on every step whose budget let it stop (not the last two: budgets 1 and 0)
    assert unsure.gammas[0] == 0 and unsure.trimmed == 8
    both = min(len(sure.drafted), len(unsure.drafted))
    assert all(unsure.drafted[s] <= 1 < out.gammas[s] for s in range(both) if sure.drafted[s] > 1)
    assert unsure.accepted_tokens == 0 and unsure.drafted_tokens == sum(unsure.drafted)


def test_pooled_goodput_by_hand():
    traces = [make_trace("c", [1, 1, 1]), make_trace("b", [0] * 4), make_trace("a", [1] * 4)]
    assert [[t.prompt_id for t in batch] for batch in compose_batches(traces, 2)] == [["a", "b"], ["c"]]

    def step_ms(batch_size: int, gamma: int, position: float) -> float:
        return 10.0 * batch_size + gamma

    # batch [a, b] with fixed:1. a: 2 + 2 tokens (2 steps); b: 1 a step (4 steps, the last drafts nothing).
    # steps: (2 rows, gamma 1) 21 ms, (2, 1) 21, (1, 1) 11, (1, 0) 10; decode: 21 + 11 + 10 = 42 ms for
    # a's 2 and b's 3 tokens after step 0.
    first = replay_batch([FixedGamma(1), FixedGamma(1)], compose_batches(traces, 2)[0], step_ms)
    assert first.step_ms == [21.0, 21.0, 11.0, 10.0]
    assert (first.decode_tokens, first.decode_ms, first.new_tokens, first.wall_ms) == (5, 42.0, 8, 63.0)
    assert first.decode_tokens_per_s == pytest.approx(1000 * 5 / 42)
    # batch [c]: 2 tokens in 11 ms, then 1 in 10 ms. Pooled: 6 tokens in 52 ms, not the mean of two rates.
    goodput = batch_goodput(lambda: FixedGamma(1), traces, 2, step_ms)
    assert goodput == pytest.approx(1000 * 6 / 52)
    assert batch_goodput(lambda: FixedGamma(1), traces[:1], 2, step_ms) == pytest.approx(1000 * 1 / 10)


@pytest.mark.parametrize(
    ("controllers", "traces", "message"),
    [
        (0, [], "no traces"),
        (1, [make_trace("a", [1] * 3), make_trace("b", [1] * 3)], "1 controllers for 2 traces"),
        (2, [make_trace("a", [1] * 3), make_trace("b", [1] * 3, compression="int8")], "compressions"),
    ],
)
def test_bad_input_is_one_clear_error(controllers, traces, message):
    with pytest.raises(SpeckvError, match=message):
        replay_batch([FixedGamma(1) for _ in range(controllers)], traces, Recorder())


def test_bad_batches_are_one_clear_error():
    shared = FixedGamma(1)
    traces = [make_trace("a", [1] * 3), make_trace("b", [1] * 3)]
    with pytest.raises(SpeckvError, match="its own controller object"):
        replay_batch([shared, shared], traces, Recorder())
    with pytest.raises(SpeckvError, match="batch_size must be >= 1"):
        compose_batches(traces, 0)
    with pytest.raises(SpeckvError, match="no traces"):
        batch_goodput(lambda: FixedGamma(1), [], 2, Recorder())
    with pytest.raises(SpeckvError, match="compressions"):
        compose_batches([*traces, make_trace("c", [1] * 3, compression="nf4")], 2)
