"""The stop rule: draft another token only while that is expected to raise tokens per second.

After k drafted tokens with predicted conditional acceptances p_1..p_k (each given all earlier ones
accepted), the survival S_i = p_1 * ... * p_i is the chance token i is accepted, so a step stopped at k
yields E(k) = 1 + S_1 + ... + S_k tokens (the target always adds one) in T(k) = cost.step_ms(k).
The next tokens' p is unknown until they are drafted; it is estimated as `discount * p_k` and the rule
looks ahead to every m <= gamma_max: keep drafting iff some E(m)/T(m) beats E(k)/T(k).
`discount` is the rule's one tunable, chosen on dev prompts by `replay_goodput` (greedy labels: stopping
at k accepts min(k, first rejection) tokens), never on test prompts.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# p is capped below 1 so a "certain" token still leaves the lookahead finite and comparable.
P_CAP = 1.0 - 1e-6


def keep_drafting(
    k: int, survival: float, expected: float, p_last: float, step_ms: Sequence[float], discount: float
) -> bool:
    """After drafting k >= 1 tokens (survival S_k, expected tokens E(k)): is drafting token k+1 worth it?

    `step_ms[m]` is the modelled time of a step that drafts m tokens; its length bounds the draft.
    Pure floats on purpose: this runs once per drafted token in the decode loop.
    """
    gamma_max = len(step_ms) - 1
    if k >= gamma_max:
        return False
    rate_now = expected / step_ms[k]
    p_next = min(discount * p_last, P_CAP)
    gain, term = 0.0, survival
    for m in range(k + 1, gamma_max + 1):
        term *= p_next
        gain += term
        if (expected + gain) / step_ms[m] > rate_now:
            return True
    return False


def stop_index(p: Sequence[float], step_ms: Sequence[float], discount: float) -> int:
    """How many tokens the rule drafts, given the predicted acceptances of a full draft (len(p) >= 1).

    Replay and evaluation use this on profiled drafts; MLPController makes the same decisions live.
    """
    limit = min(len(p), len(step_ms) - 1)
    survival, expected = 1.0, 1.0
    for k in range(1, limit + 1):
        survival *= p[k - 1]
        expected += survival
        if not keep_drafting(k, survival, expected, p[k - 1], step_ms[: limit + 1], discount):
            return k
    return limit


def replay_goodput(
    drafts: Sequence[np.ndarray],
    first_rejection: np.ndarray,
    step_ms: Sequence[Sequence[float]],
    discount: float,
) -> float:
    """Modelled tokens per second of the rule over profiled greedy steps.

    `drafts[s]`: predicted acceptances of step s's full draft; `first_rejection[s]`: its accepted count
    when drafting all of it; `step_ms[s]`: the cost table of that step's compression.
    """
    tokens, ms = 0.0, 0.0
    for p, accepted_full, cost in zip(drafts, first_rejection, step_ms, strict=True):
        k = stop_index(p, cost, discount)
        tokens += 1 + min(k, int(accepted_full))
        ms += cost[k]
    return 1000.0 * tokens / ms


def fixed_goodput(first_rejection: np.ndarray, step_ms: Sequence[Sequence[float]], gamma: int) -> float:
    """The same modelled tokens per second for always drafting `gamma` tokens: the reference to beat."""
    tokens = float(np.minimum(first_rejection, gamma).sum() + len(first_rejection))
    ms = float(sum(cost[gamma] for cost in step_ms))
    return 1000.0 * tokens / ms


def tune_discount(
    drafts: Sequence[np.ndarray],
    first_rejection: np.ndarray,
    step_ms: Sequence[Sequence[float]],
    grid: Sequence[float],
) -> tuple[float, dict[float, float]]:
    """The discount with the best replayed goodput (ties: the smallest), and the goodput of each."""
    scores = {float(d): replay_goodput(drafts, first_rejection, step_ms, d) for d in grid}
    best = max(scores, key=lambda d: (scores[d], -d))
    return best, scores
