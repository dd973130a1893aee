"""The loop's clock and the cost model fitted to it: phases that add up, a fit that recovers a known cost and
stays monotone, a calibration that runs the real loop."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from speckv.profiling.calibrate import calibrate, calibration_prompts
from speckv.profiling.controllers import parse_controller
from speckv.profiling.costfit import fit_cost_model, robust_line
from speckv.profiling.costmodel import CostModel
from speckv.profiling.decode import DecodeConfig, speculative_generate
from speckv.profiling.errors import SpeckvError
from tiny import char_tokenizer


@pytest.mark.parametrize("spec", ["none", "fixed:3", "threshold:0.5"])
def test_phase_timings_add_up_to_the_wall_time(tiny_models, spec):
    target, draft = tiny_models
    prompt = char_tokenizer()("def f(x): return x +", add_special_tokens=False)["input_ids"]
    result = speculative_generate(target, draft, prompt, parse_controller(spec, 4), DecodeConfig(30, 4))
    assert len(result.step_s) == len(result.draft_s) == len(result.verify_s) == result.steps
    assert len(result.produced) == len(result.positions) == result.steps
    # the steps chain without gaps after the target's prefill; the first token ends step 0
    assert result.prefill_s > 0 and all(t > 0 for t in result.step_s)
    assert result.prefill_s + sum(result.step_s) == pytest.approx(result.wall_s, abs=2e-3)
    assert result.ttft_s + result.decode_s == pytest.approx(result.wall_s)
    assert result.ttft_s >= result.prefill_s + result.step_s[0]
    assert result.decode_s == pytest.approx(sum(result.step_s[1:]))
    assert all(
        d + v <= s + 1e-6 for d, v, s in zip(result.draft_s, result.verify_s, result.step_s, strict=True)
    )
    # positions are the context at each step's start: the prompt, then what each step committed
    assert result.positions == list(np.cumsum([len(prompt), *result.produced[:-1]]))
    assert sum(result.produced) == result.new_tokens
    assert result.decode_tokens == result.new_tokens - result.produced[0]
    summary = result.summary()
    assert summary["decode_tokens_per_s"] == pytest.approx(result.decode_tokens / result.decode_s)


def synthetic_steps(rng, gamma_max=4, noise=0.02, outliers=5):
    """Steps of fixed-gamma runs whose true cost is 20 + 6 g + 0.06 L ms, with timing noise and a few
    descheduled steps; step 0 of each run also reads the prompt."""
    steps, runs = [], []
    for prompt, length in enumerate((40, 160, 300)):
        for gamma in range(gamma_max + 1):
            position = length
            for step in range(25):
                true = 20 + 6 * gamma + 0.06 * position
                ms = true * (1 + noise * rng.standard_normal())
                draft = 2.0 * gamma + 0.002 * gamma * position
                if step == 0 and gamma:
                    draft += 1.0 + 0.03 * position
                    ms += 1.0 + 0.03 * position
                steps.append(
                    dict(prompt=prompt, controller=gamma, step=step, position=position, gamma=gamma)
                    | dict(step_ms=ms, draft_ms=draft, verify_ms=ms - draft - 1)
                )
                position += 1 + gamma // 2
            runs.append(
                dict(prompt=prompt, controller=gamma, prompt_tokens=length, prefill_ms=5 + 0.2 * (length - 1))
                | dict(first_gamma=gamma, first_draft_ms=steps[-25]["draft_ms"])
            )
    frame = pd.DataFrame(steps)
    spikes = rng.choice(len(frame), outliers, replace=False)
    frame.loc[spikes, "step_ms"] *= 8  # a descheduled step is not a cost
    return frame, pd.DataFrame(runs)


def alternating_steps(
    rng,
    idle_extra: float,
    draft_extra: float,
    gamma_max=4,
    noise=0.02,
    reading: tuple[float, float] | None = None,
) -> pd.DataFrame:
    """Steps of alternating runs on the prompts of `synthetic_steps`: the same true cost, plus `idle_extra`
    on an idle step after a drafting one and `draft_extra` on a drafting step after an idle one; `reading`
    = (ms per step, ms per token read) makes it the run that reads signals (every drafted token but the
    last)."""
    name = "alternate" if reading is None else "alternate+signals"
    per_step, per_token = reading or (0.0, 0.0)
    steps = []
    for prompt, length in enumerate((40, 160, 300)):
        position, previous = length, 0
        for step in range(25):
            gamma = 0 if step % 2 else (step // 2) % gamma_max + 1
            true = 20 + 6 * gamma + 0.06 * position
            true += (idle_extra if previous else 0.0) if gamma == 0 else (draft_extra if step else 0.0)
            true += per_step + per_token * max(gamma - 1, 0)
            ms = true * (1 + noise * rng.standard_normal())
            steps.append(
                dict(prompt=prompt, controller=name, step=step, position=position, gamma=gamma)
                | dict(prev_gamma=previous, step_ms=ms, draft_ms=2.0 * gamma, verify_ms=ms - 2.0 * gamma)
            )
            position, previous = position + 1 + gamma // 2, gamma
    return pd.DataFrame(steps)


def test_alternating_runs_give_the_switch_costs_and_leave_the_levels_alone():
    rng = np.random.default_rng(5)
    steps, runs = synthetic_steps(rng, outliers=0)
    plain = fit_cost_model(steps, runs, 4)
    assert plain["switch_ms"] == [0.0, 0.0]  # no alternating run: nothing measured, nothing charged
    mixed = pd.concat([steps, alternating_steps(rng, idle_extra=1.5, draft_extra=0.7)], ignore_index=True)
    fitted = fit_cost_model(mixed, runs, 4)
    assert fitted["step_ms"] == plain["step_ms"] and fitted["draft_ms"] == plain["draft_ms"]
    assert fitted["switch_ms"] == pytest.approx([1.5, 0.7], abs=0.25)
    assert fitted["fit"]["switch"]["steps"] == [36, 36]  # 12 of each in steps 1..24 of 3 runs
    # a switch measured cheaper than the level is noise: never a negative cost
    cheaper = pd.concat([steps, alternating_steps(rng, idle_extra=-3.0, draft_extra=0.0)], ignore_index=True)
    assert fit_cost_model(cheaper, runs, 4)["switch_ms"][0] == 0.0


def test_the_reading_run_gives_what_reading_signals_costs_in_the_loop():
    rng = np.random.default_rng(6)
    steps, runs = synthetic_steps(rng, outliers=0)
    unmeasured = fit_cost_model(steps, runs, 4, signals=(0.01, 0.09))  # no reading run: the caller's figures
    assert (unmeasured["signal_ms"], unmeasured["target_signal_ms"]) == (0.01, 0.09)
    plain = alternating_steps(rng, idle_extra=1.0, draft_extra=0.5, noise=0.005)
    reading = alternating_steps(rng, idle_extra=1.0, draft_extra=0.5, noise=0.005, reading=(0.4, 0.8))
    fitted = fit_cost_model(pd.concat([steps, plain, reading], ignore_index=True), runs, 4)
    assert fitted["switch_ms"] == pytest.approx([1.0, 0.5], abs=0.15)
    assert fitted["target_signal_ms"] == pytest.approx(0.4, abs=0.15)
    assert fitted["signal_ms"] == pytest.approx(0.8, abs=0.1)


def test_fit_recovers_a_cost_that_grows_with_gamma_and_context():
    steps, runs = synthetic_steps(np.random.default_rng(0), outliers=0)
    fitted = fit_cost_model(steps, runs, 4)
    model = CostModel("fp32", "cpu", **{k: v for k, v in fitted.items() if k != "fit"})
    for gamma in range(5):
        for context in (60.0, 200.0, 320.0):
            true = 20 + 6 * gamma + 0.06 * context
            assert model.step_at(gamma, context) == pytest.approx(true, rel=0.02)
    assert model.draft_ms + model.draft_ms_per_token * (200 - model.context_tokens) == pytest.approx(
        2.0 + 0.002 * 200, rel=0.05
    )
    assert model.prefill_ms == pytest.approx([5.0, 0.2], rel=1e-6)
    # the first forward reads the prompt and drafts a token: 0.03 + 0.002 ms per prompt token
    assert model.draft_prefill_ms[1] == pytest.approx(0.032, rel=0.05)


def test_fit_is_monotone_in_gamma_and_context():
    """Noise that makes gamma 3 look cheaper than 2 is pooled away, and one gamma whose steps fall with the
    context cannot give the model a negative slope: the slope is shared and clipped at 0."""
    steps, runs = synthetic_steps(np.random.default_rng(1), noise=0.01, outliers=0)
    steps.loc[steps["gamma"] == 3, "step_ms"] -= 20  # cheaper than gamma 2 at every context
    g1 = steps["gamma"] == 1
    steps.loc[g1, "step_ms"] -= 0.2 * steps.loc[g1, "position"]  # falls with context
    fitted = fit_cost_model(steps, runs, 4)
    model = CostModel("fp32", "cpu", **{k: v for k, v in fitted.items() if k != "fit"})
    lo, hi = fitted["fit"]["contexts"]
    assert len(set(model.step_ms_per_token)) == 1 and model.step_ms_per_token[0] >= 0
    for context in np.linspace(lo, hi, 7):
        costs = [model.step_at(g, context) for g in range(5)]
        assert costs == sorted(costs)
    # where the measurements grow with context, so does the model
    steps, runs = synthetic_steps(np.random.default_rng(2), noise=0.01, outliers=0)
    assert fit_cost_model(steps, runs, 4)["step_ms_per_token"][0] == pytest.approx(0.06, rel=0.05)
    steps["step_ms"] -= 0.1 * steps["position"]  # every gamma falls with context: noise, not a cost
    assert fit_cost_model(steps, runs, 4)["step_ms_per_token"] == [0.0] * 5


def test_robust_line_ignores_a_spike_and_handles_one_context():
    x = np.arange(20.0)
    y = 3 + 0.5 * x
    y[7] = 500
    assert robust_line(x, y) == pytest.approx((3.0, 0.5))
    assert robust_line([5, 5, 5], [1.0, 2.0, 9.0]) == (2.0, 0.0)
    with pytest.raises(SpeckvError):
        robust_line([], [])


def test_calibration_prompts_span_the_lengths():
    prompts = [[1] * n for n in (9, 3, 50, 20, 7)]
    assert [len(p) for p in calibration_prompts(prompts, 3)] == [3, 9, 50]
    assert [len(p) for p in calibration_prompts(prompts, 10)] == [3, 7, 9, 20, 50]
    with pytest.raises(SpeckvError):
        calibration_prompts([], 2)


def test_calibrate_fits_the_real_loop(tiny_models, tmp_path):
    target, draft = tiny_models
    tok = char_tokenizer()
    prompts = [
        tok(t, add_special_tokens=False)["input_ids"] for t in ("x = 1", "def f(a, b):\n    return a * b")
    ]
    model, steps = calibrate(
        target, draft, "fp32", prompts, gamma_max=3, max_new_tokens=12, repeats=2, warmup=1
    )
    assert model.gamma_max == 3 and len(model.step_ms_per_token) == 4
    assert set(steps["controller"]) == {
        "fixed:0",
        "fixed:1",
        "fixed:2",
        "fixed:3",
        "alternate",
        "alternate+signals",
    }
    assert (
        model.meta["fit"]["signals"]["steps"][0] > 0 and model.signal_ms >= 0 and model.target_signal_ms >= 0
    )
    assert set(steps["prompt"]) == {0, 1} and len(model.switch_ms) == 2 and min(model.switch_ms) >= 0
    assert model.step_ms == sorted(model.step_ms) and min(model.step_ms_per_token) >= 0
    assert model.meta["prompt_tokens"] == [len(p) for p in prompts]
    assert len(model.meta["isolated"]["verify_ms"]) == 4
    model.save(tmp_path / "fp32.json")
    again = CostModel.load(tmp_path / "fp32.json")
    assert again.step_costs().step(2, 30) == pytest.approx(model.step_at(2, 30))
    assert again.step_costs().switch == tuple(model.switch_ms)


def test_an_old_cost_model_file_says_to_recalibrate(tmp_path):
    path = tmp_path / "fp32.json"
    path.write_text('{"compression": "fp32", "device": "cpu", "draft_ms": 3.0, "verify_ms": [70.0, 90.0]}')
    with pytest.raises(SpeckvError, match="rerun `speckv calibrate`"):
        CostModel.load(path)


def test_a_descheduled_step_is_left_out_but_a_slower_stretch_counts():
    """One step 20x its time (another job took the core) must not move the level or the context slope; a
    stretch of steps a few percent slower is load a run pays, so it stays in the mean."""
    rng = np.random.default_rng(3)
    steps, runs = synthetic_steps(rng, noise=0.0, outliers=0)
    clean = fit_cost_model(steps, runs, 4)
    rows = steps.index[(steps["gamma"] == 2) & (steps["step"] > 0)]
    spiked = steps.copy()
    spiked.loc[rows[-1], "step_ms"] *= 20  # one step at the longest context of gamma 2
    fitted = fit_cost_model(spiked, runs, 4)
    assert fitted["step_ms_per_token"] == pytest.approx(clean["step_ms_per_token"], abs=1e-9)
    assert fitted["step_ms"] == pytest.approx(clean["step_ms"], rel=1e-9)
    # with timing noise (a median absolute deviation to measure against), 4% slower steps are not stalls
    steps, runs = synthetic_steps(rng, noise=0.02, outliers=0)
    clean = fit_cost_model(steps, runs, 4)
    slower = steps.copy()
    slower.loc[rows[:4], "step_ms"] *= 1.04
    level = fit_cost_model(slower, runs, 4)["step_ms"][2]
    added = float((steps.loc[rows[:4], "step_ms"] * 0.04).sum()) / len(rows)
    assert level == pytest.approx(clean["step_ms"][2] + added, rel=1e-3)
