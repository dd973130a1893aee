"""The stop rule: draft another token only while that is expected to raise tokens per second.

After k drafted tokens with predicted conditional acceptances p_1..p_k (each given all earlier ones
accepted), the survival S_i = p_1 * ... * p_i is the chance token i is accepted, so a step stopped at k
yields E(k) = 1 + S_1 + ... + S_k tokens (the target always adds one) in T(k) = cost.step_ms(k).
The next tokens' p is unknown until they are drafted; it is estimated as `discount * p_k` and the rule
looks ahead to every m <= gamma_max: keep drafting iff some E(m)/T(m) beats E(k)/T(k).
In a batch of B rows that share every step (one verify, as wide as the longest draft), a row's extra
token lengthens the step for all B rows while adding to its own tokens only: `share` (1/B, or a dev-tuned
power of it) weighs the lookahead's gain against the batch's tokens, so E(k) + share * gain is compared.
`discount` is tuned on dev prompts by replaying the deployed controller on dense traces
(predictor.stop_rule.tune_stop_rule), never on test prompts. The step-start decision (draft at all?) is the same
rule at k = 0 with the step-start model's first-token acceptance and its own tuned discount (or off: always
draft). `draft_cap` bounds how far the rule can ever go under a cost table: where a dearer verify makes a
second token never worth it, the loop drafts one and reads no signals at all.
"""

from __future__ import annotations

from collections.abc import Sequence

# p is capped below 1 so a "certain" token still leaves the lookahead finite and comparable.
P_CAP = 1.0 - 1e-6


def keep_drafting(
    k: int,
    survival: float,
    expected: float,
    p_last: float,
    step_ms: Sequence[float],
    discount: float,
    share: float = 1.0,
) -> bool:
    """After drafting k >= 1 tokens (survival S_k, expected tokens E(k)): is drafting token k+1 worth it?

    `step_ms[m]` is the modelled time of a step that drafts m tokens; its length bounds the draft. `share`
    weighs the gain of drafting on (1 at batch 1; below 1 where the step's cost is shared by a batch).
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
        if (expected + share * gain) / step_ms[m] > rate_now:
            return True
    return False


def stop_index(p: Sequence[float], step_ms: Sequence[float], discount: float) -> int:
    """How many tokens the rule drafts, given the predicted acceptances of a full draft (len(p) >= 1).

    The rule in its pure form, for a draft whose acceptances are all known (tests hold MLPController to it).
    """
    limit = min(len(p), len(step_ms) - 1)
    survival, expected = 1.0, 1.0
    for k in range(1, limit + 1):
        survival *= p[k - 1]
        expected += survival
        if not keep_drafting(k, survival, expected, p[k - 1], step_ms[: limit + 1], discount):
            return k
    return limit


# a relative slack in draft_cap's favour of drafting on, so float rounding never caps below the rule
_CAP_SLACK = 1e-9


def draft_cap(step_ms: Sequence[float], discount: float, share: float = 1.0) -> int:
    """The most tokens `keep_drafting` can ever let a step draft under this cost table and discount.

        After k tokens, E(k) = 1 + S_1 + ... + S_k >= 1 + k * S_k, so S_k / E(k) <= 1 / (k + 1), and every later
        token's p is at most q = min(discount, P_CAP). The rule goes on only if some m > k has
        (E(k) + S_k * (q + ... + q^(m-k))) / T(m) > E(k) / T(k); if even the bound S_k / E(k) = 1 / (k + 1)
        fails that for every m, the rule stops at k whatever the signals say. The cap is the first such k. `share`
    as in keep_drafting.
    """
    gamma_max = len(step_ms) - 1
    q = min(discount, P_CAP)
    for k in range(1, gamma_max):
        ratio, term, gain = 1.0 / (k + 1), 1.0, 0.0
        worth = False
        for m in range(k + 1, gamma_max + 1):
            term *= q
            gain += term
            if (1.0 + share * ratio * gain) * step_ms[k] * (1.0 + _CAP_SLACK) > step_ms[m]:
                worth = True
                break
        if not worth:
            return k
    return max(gamma_max, 0)
