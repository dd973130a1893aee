"""The batched cost model: calibrated in the batched loop per batch size, interpolated between them."""

from __future__ import annotations

import pytest
from speckv.profiling.batch_costs import BatchCostModel, calibrate_batches, calibration_runs, fit_batch
from speckv.profiling.costmodel import CostModel
from speckv.profiling.errors import SpeckvError
from tiny import perturbed_draft, tiny_target


def model(step_ms, slope=0.0, context=100.0, batch=1) -> CostModel:
    return CostModel(
        compression="fp32",
        device="cpu",
        context_tokens=context,
        step_ms=step_ms,
        step_ms_per_token=[slope] * len(step_ms),
        draft_ms=1.0,
        meta={"batch": batch},
    )


def test_costs_interpolate_between_batch_sizes_and_extrapolate_past_the_largest():
    costs = BatchCostModel("fp32", {4: model([20.0, 40.0], batch=4), 1: model([10.0, 16.0], slope=0.1)})
    assert costs.batch_sizes == [1, 4] and costs.gamma_max == 1
    assert costs.step(1, 1, 110.0) == pytest.approx(17.0)
    assert costs.step(2, 0, 100.0) == pytest.approx(10.0 + 10.0 / 3)
    assert costs.step(7, 1, 100.0) == pytest.approx(40.0 + 24.0)  # along the last two sizes
    assert costs.step_costs(3)[1] == 16.0 and costs.step_costs(8)[1] == 40.0
    with pytest.raises(SpeckvError, match="batch size 0"):
        costs.step(0, 0, 100.0)
    with pytest.raises(SpeckvError, match="different gamma_max"):
        BatchCostModel("fp32", {1: model([1.0, 2.0]), 2: model([1.0, 2.0, 3.0])})


def test_the_model_survives_a_round_trip(tmp_path):
    costs = BatchCostModel("int8", {1: model([10.0, 16.0]), 2: model([12.0, 20.0])}, {"threads": 2})
    costs.save(tmp_path / "int8_batch.json")
    again = BatchCostModel.load(tmp_path / "int8_batch.json")
    assert again.models == costs.models and again.meta == {"threads": 2}
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(SpeckvError, match="corrupt"):
        BatchCostModel.load(tmp_path / "bad.json")


def test_a_fit_is_a_level_per_gamma_and_one_context_slope():
    import pandas as pd

    rows = [
        {
            "batch": 2,
            "gamma": g,
            "position": pos,
            "step_ms": 10.0 + 5.0 * g + 0.5 * (pos - 50),
            "draft_ms": 2.0 * g,
        }
        for g in range(3)
        for pos in (40, 50, 60, 70)
    ]
    fitted = fit_batch(pd.DataFrame(rows), 2, "fp32", "cpu")
    assert fitted.step_ms_per_token == pytest.approx([0.5] * 3)
    assert fitted.step_at(2, 50.0) == pytest.approx(20.0) and fitted.draft_ms == pytest.approx(2.0)
    with pytest.raises(SpeckvError, match="no batched step ran 3"):
        fit_batch(pd.DataFrame(rows), 3, "fp32", "cpu")


def test_the_width_slope_grows_with_the_draft_forwards_that_also_read_the_width():
    import pandas as pd

    rows = [
        {
            "batch": 8,
            "gamma": g,
            "position": width,
            "step_ms": 90.0 + 30.0 * g + (0.05 + 0.02 * g) * (width - 200),
            "draft_ms": 3.0 * g,
        }
        for g in range(4)
        for width in (100, 150, 350, 400)
    ]
    fitted = fit_batch(pd.DataFrame(rows), 3, "fp32", "cpu")
    assert fitted.step_ms_per_token == pytest.approx([0.05, 0.07, 0.09, 0.11], abs=1e-6)
    assert fitted.step_at(0, 400.0) == pytest.approx(100.0, abs=0.05)
    assert fitted.step_at(3, 100.0) == pytest.approx(180.0 - 11.0, abs=0.05)


def test_calibration_batches_span_narrow_and_wide_groups_of_the_sorted_prompts():
    runs = calibration_runs(6, [1, 4, 8], gamma_max=1)
    assert [r for r in runs if r[0] == 1 and r[1] == 0] == [(1, 0, k, 1) for k in range(6)]
    # ceil(6 / 4) = 2 groups of 3 prompts; at 8 still two groups, not one batch cycling through all six
    for b in (4, 8):
        assert sorted(r[2:] for r in runs if r[0] == b and r[1] == 0) == [(0, 3), (3, 3)]
    assert {(b, g) for b, g, _, _ in runs} == {(b, g) for b in (1, 4, 8) for g in (0, 1)}
    assert calibration_runs(1, [4], gamma_max=0) == [(4, 0, 0, 1)]
    assert [r[2:] for r in calibration_runs(5, [2], gamma_max=0)] == [(0, 1), (1, 2), (3, 2)]


def test_calibration_runs_the_batched_loop_at_every_size_and_gamma():
    target = tiny_target()
    draft = perturbed_draft(target, 0.02)
    prompts = [list(range(5, 5 + n)) for n in (6, 9, 13)]
    costs, steps = calibrate_batches(
        target, draft, "fp32", prompts, [1, 2, 4], gamma_max=2, max_new_tokens=10
    )
    assert costs.batch_sizes == [1, 2, 4] and costs.gamma_max == 2
    assert set(steps["batch"]) == {1, 2, 4} and set(steps["fixed"]) == {0, 1, 2}
    assert (steps["step"] > 0).all()  # the first step belongs to the time to first token
    alone = steps[steps["batch"] == 1]  # batch 1 decodes every prompt, so its slope spans their contexts
    assert alone["position"].min() < 9 and alone["position"].max() >= 13
    # a batch's context is its longest row's: the short group's batch of 4 is narrower than the long one's
    four = steps[(steps["batch"] == 4) & (steps["fixed"] == 0) & (steps["step"] == 1)]
    assert sorted(four["position"]) == [6 + 1, 13 + 1]  # one token committed per step at gamma 0
    for m in costs.models.values():
        assert m.step_ms == sorted(m.step_ms) and min(m.step_ms) > 0
    with pytest.raises(SpeckvError, match="batch sizes >= 1"):
        calibrate_batches(target, draft, "fp32", prompts, [0], gamma_max=2, max_new_tokens=10)
