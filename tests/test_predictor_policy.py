import math

import numpy as np
import pytest

from predictor.features import FEATURES
from predictor.policy import fixed_goodput, keep_drafting, replay_goodput, stop_index, tune_discount
from predictor.runtime import AcceptancePredictor, MLPController
from profiling.controllers import Controller, StepContext
from profiling.errors import SpeckvError
from profiling.signals import TokenSignals

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


def test_replay_and_tuning():
    drafts = [np.full(8, 0.95), np.full(8, 0.2)]
    first_rejection = np.array([8, 0])
    costs = [STEP_MS, STEP_MS]
    # The rule drafts 8 then 1 token: (9 + 1) tokens in (26 + 12) ms.
    assert replay_goodput(drafts, first_rejection, costs, 1.0) == pytest.approx(1000 * 10 / 38)
    assert fixed_goodput(first_rejection, costs, 8) == pytest.approx(1000 * 10 / 52)
    best, scores = tune_discount(drafts, first_rejection, costs, [0.5, 1.0])
    assert best in scores and scores[best] == max(scores.values())


def toy_predictor() -> AcceptancePredictor:
    """p = sigmoid(10 * (draft_prob - 0.5)) through a 16-unit relu layer (only unit 0 used)."""
    n = len(FEATURES)
    W1 = np.zeros((n, 16))
    W1[FEATURES.index("draft_prob"), 0] = 10.0
    weights = {
        "scaler_mean": np.zeros(n),
        "scaler_scale": np.ones(n),
        "W1": W1,
        "b1": np.zeros(16),
        "W2": np.r_[1.0, np.zeros(15)].reshape(16, 1),
        "b2": np.array([-5.0]),
    }
    meta = {
        "features": list(FEATURES),
        "calibration": {"kind": "none"},
        "stop_rule": {"gamma_max": 8, "discount": 1.0, "step_ms": {"fp32": STEP_MS}},
    }
    return AcceptancePredictor(weights, meta)


def test_controller_follows_stop_rule():
    controller = MLPController(toy_predictor(), gamma_max=8, compression="fp32", name="mlp:toy")
    assert isinstance(controller, Controller)
    draft_probs = [0.97, 0.95, 0.9, 0.6, 0.3, 0.9, 0.9, 0.9]
    p = [1 / (1 + math.exp(-10 * (d - 0.5))) for d in draft_probs]
    expected_stop = stop_index(p, STEP_MS, 1.0)
    assert 1 < expected_stop < 8
    controller.reset()
    ctx = StepContext(step=0, position=30, new_tokens=0, prev_gamma=0, prev_accepted=0, compression="fp32")
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


def test_mlp_controller_skips_drafting_when_first_tokens_rarely_pass():
    """With a first-token acceptance prior too low to pay for a draft, the target goes alone, the controller
    probes now and then, and drafting resumes once drafts are accepted again."""
    from predictor.runtime import PROBE_EVERY

    predictor = toy_predictor()
    predictor.stop_rule["step_ms"]["fp32"] = [60.0] + [60.0 + 10.0 * m for m in range(1, 9)]
    predictor.stop_rule["first_accept"] = {"fp32": 0.05}
    controller = MLPController(predictor, gamma_max=8, compression="fp32", name="mlp:toy")
    controller.reset()
    ctx = StepContext(step=0, position=10, new_tokens=0, prev_gamma=0, prev_accepted=0, compression="fp32")
    budgets = [controller.start_step(ctx) for _ in range(PROBE_EVERY + 1)]
    assert budgets[:PROBE_EVERY] == [0] * PROBE_EVERY and budgets[-1] == 8
    for _ in range(12):
        controller.observe(4, 4)
    assert controller.start_step(ctx) == 8
    predictor.stop_rule["first_accept"] = {"fp32": 0.9}  # a good prior drafts from the first step
    assert MLPController(predictor, gamma_max=8, compression="fp32", name="mlp:toy").start_step(ctx) == 8
