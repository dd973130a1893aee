import math

import numpy as np
import pytest
from speckv.predictor.features import FEATURES, START_FEATURES
from speckv.predictor.policy import draft_cap, keep_drafting, stop_index
from speckv.predictor.runtime import AcceptancePredictor, MLPController
from speckv.profiling.controllers import Controller, StepContext
from speckv.profiling.errors import SpeckvError
from speckv.profiling.signals import TokenSignals

STEP_MS = [10.0 + 2.0 * k for k in range(9)]  # draft 1 ms + verify growth 1 ms per token


def test_stop_index_extremes():
    assert stop_index([0.999] * 8, STEP_MS, 1.0) == 8
    assert stop_index([0.01] * 8, STEP_MS, 1.0) == 1
    assert stop_index([0.99, 0.99, 0.05, 0.99], STEP_MS, 1.0) == 3


def test_keep_drafting_is_the_rate_comparison():
    # After k=1 with p=0.9: E(1)=1.9, T(1)=12; one more with p_next=0.9: E(2)=2.71, T(2)=14.
    assert keep_drafting(1, 0.9, 1.9, 0.9, STEP_MS, 1.0) == (2.71 / 14 > 1.9 / 12)
    # At p=0.1 no lookahead horizon pays for its verify time.
    assert not keep_drafting(1, 0.1, 1.1, 0.1, STEP_MS, 1.0)
    assert not keep_drafting(8, 0.9, 5.0, 0.9, STEP_MS, 1.0)


def test_a_batch_share_weighs_the_gain_against_the_whole_batchs_step():
    # one row of 8 gains 0.81 tokens by a step 2 ms longer for all 8: (8 * 1.9 + 0.81) / 14 < 8 * 1.9 / 12
    assert keep_drafting(1, 0.9, 1.9, 0.9, STEP_MS, 1.0, share=1.0)
    assert not keep_drafting(1, 0.9, 1.9, 0.9, STEP_MS, 1.0, share=1 / 8)
    assert draft_cap(STEP_MS, 1.0, share=1 / 8) <= draft_cap(STEP_MS, 1.0) == 8
    shared = MLPController(toy_predictor(), gamma_max=8, compression="fp32", name="mlp:toy", share=1 / 8)
    alone = MLPController(toy_predictor(), gamma_max=8, compression="fp32", name="mlp:toy")
    signals = TokenSignals(0.9, 0.9, 0.45, 0.1, 0, 30)
    for c in (shared, alone):
        c.start_step(StepContext(0, 30, 0, 0, 0, "fp32", 0.99, 0.1, 0.99))
    assert alone.keep_drafting(signals) and not shared.keep_drafting(signals)
    with pytest.raises(SpeckvError, match="share must be in"):
        MLPController(toy_predictor(), gamma_max=8, compression="fp32", name="mlp:toy", share=0.0)


def _one_unit(names: tuple[str, ...], feature: str, scale: float, bias: float) -> dict[str, np.ndarray]:
    """p = sigmoid(scale * x[feature] + bias) through a 16-unit relu layer (only unit 0 used)."""
    n = len(names)
    W1 = np.zeros((n, 16))
    W1[names.index(feature), 0] = scale
    return {
        "scaler_mean": np.zeros(n),
        "scaler_scale": np.ones(n),
        "W1": W1,
        "b1": np.zeros(16),
        "W2": np.r_[1.0, np.zeros(15)].reshape(16, 1),
        "b2": np.array([bias]),
    }


def toy_predictor(
    trim: bool = False, start_discount: float | None = 1.0, step_ms: list[float] = STEP_MS
) -> AcceptancePredictor:
    """Token model p = sigmoid(10 * (draft_prob - 0.5)); step-start model p0 = sigmoid(10 * (top1 - 0.5))."""
    from speckv.predictor.runtime import start_predictor

    weights = _one_unit(FEATURES, "draft_prob", 10.0, -5.0)
    weights.update({f"start_{k}": v for k, v in _one_unit(START_FEATURES, "target_top1", 10.0, -5.0).items()})
    meta = {
        "features": list(FEATURES),
        "calibration": {"kind": "none"},
        "start": {"features": list(START_FEATURES), "calibration": {"kind": "none"}},
        "stop_rule": {
            "gamma_max": 8,
            "discount": 1.0,
            "start_discount": start_discount,
            "trim": trim,
            "step_ms": {"fp32": step_ms},
            "draft_ms": {"fp32": 1.0},
        },
    }
    predictor = AcceptancePredictor(weights, meta)
    predictor.start = start_predictor(predictor, weights)
    return predictor


def context(top1: float = 0.95) -> StepContext:
    return StepContext(
        step=0,
        position=30,
        new_tokens=0,
        prev_gamma=0,
        prev_accepted=0,
        compression="fp32",
        target_top1=top1,
        target_entropy=0.2,
        target_recent=top1,
    )


def test_controller_follows_stop_rule():
    controller = MLPController(toy_predictor(), gamma_max=8, compression="fp32", name="mlp:toy")
    assert isinstance(controller, Controller)
    draft_probs = [0.97, 0.95, 0.9, 0.6, 0.3, 0.9, 0.9, 0.9]
    p = [1 / (1 + math.exp(-10 * (d - 0.5))) for d in draft_probs]
    expected_stop = stop_index(p, STEP_MS, 1.0)
    assert 1 < expected_stop < 8
    controller.reset()
    ctx = context()
    assert controller.start_step(ctx) == 8
    drafted = 0
    for i, d in enumerate(draft_probs):
        drafted += 1
        if not controller.keep_drafting(TokenSignals(d, d, d / 2, 1.0 - d, i, 30 + i)):
            break
    assert drafted == expected_stop
    controller.observe(drafted, drafted - 1)
    # A new step starts from scratch: the running aggregates and survival reset.
    controller.start_step(ctx)
    assert controller.keep_drafting(TokenSignals(0.97, 0.97, 0.5, 0.1, 0, 40))


def test_controller_rejects_bad_settings():
    with pytest.raises(SpeckvError, match="gamma_max 12 exceeds"):
        MLPController(toy_predictor(), gamma_max=12, compression="fp32", name="mlp:toy")
    with pytest.raises(SpeckvError, match="not one of"):
        MLPController(toy_predictor(), gamma_max=8, compression="q4", name="mlp:toy")
    with pytest.raises(SpeckvError, match="no cost model"):
        MLPController(toy_predictor(), gamma_max=8, compression="int8", name="mlp:toy")


def test_step_start_model_decides_whether_to_draft_at_all():
    """A confident target (p0 near 1) drafts; an unsure one (p0 near 0) lets the target go alone; a larger
    start discount makes the same unsure context worth a draft."""
    controller = MLPController(toy_predictor(), gamma_max=8, compression="fp32", name="mlp:toy")
    assert controller.start_step(context(top1=0.95)) == 8
    assert controller.start_step(context(top1=0.2)) == 0
    # p0(0.33) = 0.154: a 1-token draft needs p > 0.2 to pay for its 2 ms (1.2 tokens per 12 ms vs 1 per 10);
    # with start discount 2 the rule counts p = 0.31 and drafts
    assert controller.start_step(context(top1=0.33)) == 0
    eager = MLPController(toy_predictor(start_discount=2.0), gamma_max=8, compression="fp32", name="mlp:toy")
    assert eager.start_step(context(top1=0.33)) == 8


def test_trim_drops_a_weak_last_token_only_when_enabled():
    weak_last = [0.97, 0.96, 0.2]  # the rule learns the third token is weak only after drafting it
    for trim, verified in ((False, 3), (True, 2)):
        controller = MLPController(toy_predictor(trim=trim), gamma_max=8, compression="fp32", name="mlp:toy")
        controller.start_step(context())
        drafted = 0
        for i, d in enumerate(weak_last):
            drafted += 1
            if not controller.keep_drafting(TokenSignals(d, d, d / 2, 1.0 - d, i, 30 + i)):
                break
        assert drafted == 3
        assert controller.submit(drafted) == verified
    # a draft that ran to its budget has an unscored last token: verified whole
    controller = MLPController(toy_predictor(trim=True), gamma_max=8, compression="fp32", name="mlp:toy")
    controller.start_step(context())
    controller.keep_drafting(TokenSignals(0.9, 0.9, 0.4, 0.1, 0, 30))
    assert controller.submit(2) == 2


def test_per_compression_knobs_override_the_default():
    predictor = toy_predictor(start_discount=1.0)
    predictor.stop_rule["step_ms"]["nf4"] = STEP_MS
    predictor.stop_rule["draft_ms"]["nf4"] = 1.0
    predictor.stop_rule["by_compression"] = {"nf4": {"discount": 0.6, "start_discount": 2.0, "trim": True}}
    fp32 = MLPController(predictor, gamma_max=8, compression="fp32", name="mlp:toy")
    nf4 = MLPController(predictor, gamma_max=8, compression="nf4", name="mlp:toy")
    assert (fp32.discount, fp32.start_discount, fp32.trim) == (1.0, 1.0, False)
    assert (nf4.discount, nf4.start_discount, nf4.trim) == (0.6, 2.0, True)


# a verify that jumps at 3 tokens, as int8's on the default pair (56 / 61 / 103 ms for 0 / 1 / 2 drafted)
STEEP_MS = [56.0, 61.0, 103.0, 106.0, 108.0, 109.0, 111.0, 113.0, 114.0]


def test_draft_cap_bounds_the_rule_whatever_the_acceptances():
    rng = np.random.default_rng(0)
    tight = 0
    for _ in range(3000):
        step_ms = np.cumsum(rng.uniform(0.0, 30.0, size=9)) + 10.0
        discount = float(rng.choice([0.2, 0.4, 0.7, 1.0, 1.2]))
        cap = draft_cap(step_ms, discount)
        p = rng.uniform(0.0, 1.0, size=8) ** rng.uniform(0.05, 2.0)
        drafted = stop_index(p, step_ms, discount)
        assert 1 <= drafted <= cap <= 8
        tight += drafted == cap
    assert tight > 300  # the bound is reached, not just safe
    assert draft_cap(STEEP_MS, 0.2) == 1 and draft_cap(STEEP_MS, 1.0) == 8
    assert draft_cap(STEP_MS, 1.0) == 8


def test_a_capped_controller_drafts_what_the_rule_would_and_reads_only_what_can_change_it():
    """Under a steep verify the rule never drafts a second token at discount 0.2: the controller asks for
    one, reads no draft signals, and with the step-start decision off reads no target signals either: it
    is fixed:1. Where the cap is not reached its decisions are the uncapped rule's."""
    predictor = toy_predictor(step_ms=STEEP_MS)
    predictor.stop_rule["discount"] = 0.2
    capped = MLPController(predictor, gamma_max=8, compression="fp32", name="mlp:toy")
    assert (capped.cap, capped.needs_signals, capped.needs_target_signals) == (1, False, True)
    assert capped.start_step(context(top1=0.95)) == 1 and capped.start_step(context(top1=0.2)) == 0
    predictor.stop_rule["start_discount"] = None
    blind = MLPController(predictor, gamma_max=8, compression="fp32", name="mlp:toy")
    assert (blind.needs_signals, blind.needs_target_signals) == (False, False)
    assert blind.start_step(context(top1=0.0)) == 1

    for probs in ([0.97, 0.95, 0.9, 0.6, 0.3], [0.99] * 8, [0.4, 0.99]):
        predictor = toy_predictor(step_ms=STEP_MS)
        predictor.stop_rule["discount"] = 0.6
        controller = MLPController(predictor, gamma_max=8, compression="fp32", name="mlp:toy")
        budget = controller.start_step(context())
        assert budget == controller.cap == draft_cap(STEP_MS, 0.6) < 8
        p = [1 / (1 + math.exp(-10 * (d - 0.5))) for d in probs]
        drafted = 0
        for i, d in enumerate(probs[: budget - 1]):
            drafted += 1
            if not controller.keep_drafting(TokenSignals(d, d, d / 2, 1.0 - d, i, 30 + i)):
                break
        else:
            drafted += 1  # the budget's last token, never asked about
        assert drafted == stop_index(p + [0.0] * 8, STEP_MS, 0.6)
