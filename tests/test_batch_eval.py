"""Gamma by batch size, end to end on the tiny pair: traced, calibrated in batches, replayed, run live."""

from __future__ import annotations

import json

import pytest
from eval_synthetic import write_mlp_export
from speckv.predictor.evaluation.batch_eval import MLP, BatchConfig, batch_mlp, prompt_batches, run_batch
from speckv.profiling.batch_costs import BatchCostModel
from speckv.profiling.costmodel import CostModel
from speckv.profiling.errors import SpeckvError
from tiny import write_prompt_file


def test_live_batches_are_the_batches_replay_made_and_keep_a_short_last_one():
    from test_batch_replay import make_trace

    traces = [make_trace(p, [1, 0, 2]) for p in ("c", "a", "e", "b", "d")]
    items = [{"prompt_id": p} for p in ("d", "b", "e", "a", "c")]
    groups = prompt_batches(items, traces, 2)
    assert [[p["prompt_id"] for p in g] for g in groups] == [["a", "b"], ["c", "d"], ["e"]]


def test_the_config_refuses_what_it_cannot_run():
    with pytest.raises(SpeckvError, match="must hold 1"):
        BatchConfig(batch_sizes=[2, 4])
    with pytest.raises(SpeckvError, match="live batch size"):
        BatchConfig(batch_sizes=[1, 2], live_batch_sizes=[4])
    with pytest.raises(SpeckvError, match="calibration_tokens"):
        BatchConfig(gamma_max=8, calibration_tokens=10)
    with pytest.raises(SpeckvError, match="max_new_tokens must be >= 2"):
        BatchConfig(max_new_tokens=1)


def test_a_batch_larger_than_the_prompts_is_refused(tmp_path):
    prompts = str(write_prompt_file(tmp_path / "prompts.jsonl"))
    with pytest.raises(SpeckvError, match="batch sizes up to 64 need as many dev prompts"):
        run_batch(
            BatchConfig(prompts=prompts, batch_sizes=[1, 64], live_batch_sizes=[1], out_dir=str(tmp_path))
        )
    assert not any(tmp_path.glob("*.json"))


def test_the_mlp_optimises_the_batch_sizes_own_costs(tmp_path):
    from speckv.predictor.controller import shared_export

    predictor = shared_export(write_mlp_export(tmp_path / "export", ("fp32",), gamma_max=4))
    before = list(predictor.stop_rule["step_ms"]["fp32"])

    def model(step_ms):
        return CostModel("fp32", "cpu", 50.0, step_ms, [0.0] * len(step_ms), draft_ms=1.0)

    costs = BatchCostModel("fp32", {1: model([10.0, 11, 12, 13, 14]), 8: model([40.0, 80, 120, 160, 200])})
    cheap, dear = (
        batch_mlp(predictor, 4, "fp32", costs, 1, 1.0)(),
        batch_mlp(predictor, 4, "fp32", costs, 8, 0.0)(),
    )
    assert cheap.name == dear.name == MLP
    assert cheap.step_ms == (10.0, 11, 12, 13, 14) and dear.step_ms[4] == 200.0
    assert cheap.share == 1.0 == dear.share  # batch 1's share is 1 whatever the exponent; exponent 0 is 1
    assert dear.cap <= cheap.cap  # a dear verify at batch 8 drafts no further than at batch 1
    shared = batch_mlp(predictor, 4, "fp32", costs, 8, 1.0)()
    assert shared.share == 1 / 8 and shared.cap <= dear.cap
    assert predictor.stop_rule["step_ms"]["fp32"] == before  # the shared export is left as it was


def test_batch_1s_best_gamma_runs_live_only_where_no_fixed_policy_is_it():
    from speckv.predictor.evaluation.batch_eval import BEST, BEST_AT_1, NONE, compared, same_as

    best = {1: 3, 4: 3, 8: 0, 16: 1}
    assert BEST_AT_1 not in compared(best, 4, None) and same_as(best, 4) == BEST
    assert BEST_AT_1 in compared(best, 16, None) and same_as(best, 16) == BEST_AT_1
    assert compared(best, 16, None)[BEST_AT_1]().start_step(None) == 3
    assert same_as({1: 0, 4: 2}, 4) == NONE


def test_gamma_by_batch_size_end_to_end(tiny_pair_dir, tmp_path):
    target, draft = tiny_pair_dir
    config = BatchConfig(
        target=str(target),
        draft=str(draft),
        compressions=["fp32", "int8"],
        prompts=str(write_prompt_file(tmp_path / "prompts.jsonl")),
        export_dir=str(write_mlp_export(tmp_path / "export", ("fp32", "int8"), gamma_max=3)),
        out_dir=str(tmp_path / "batch"),
        batch_sizes=[1, 2],
        live_batch_sizes=[1, 2],
        gamma_max=3,
        dev_per_task=1,
        test_per_task=1,
        max_new_tokens=12,
        calibration_prompts=2,
        calibration_tokens=8,
        n_boot=50,
    )
    summary = run_batch(config)
    out = tmp_path / "batch"
    for name in ("summary.json", "speculation_schedule.json", "live.parquet", "replay.parquet"):
        assert (out / name).is_file(), name
    for compression in ("fp32", "int8"):
        section = summary["compressions"][compression]
        assert set(section["best_gamma"]) == {"1", "2"}
        assert BatchCostModel.load(out / f"{compression}_batch.json").batch_sizes == [1, 2]
        # the live runs' own clock: the live batch sizes, calibrated between the live batches
        assert BatchCostModel.load(out / f"{compression}_batch_live_clock.json").batch_sizes == [1, 2]
        tuning_errors = [abs(e["tuning_model_error"]) for p in section["live"].values() for e in p.values()]
        assert section["tuning_model_max_abs_error"] == pytest.approx(max(tuning_errors))
        for size, policies in section["live"].items():
            for name, entry in policies.items():
                # every row's tokens equal the target alone's: batched greedy decoding is lossless
                assert entry["lossless_batches"] == entry["batches"] > 0, (compression, size, name)
                assert entry["measured_tokens_per_s"] > 0 and entry["replay_tokens_per_s"] > 0
                assert entry["tuning_model_tokens_per_s"] > 0  # replay under the calibration, beside
            assert "vs_none" in policies[MLP] and "vs_batch_1_best" in policies[MLP]
        for row in section["by_batch_size"].values():
            assert row["mlp_share_exponent"] in (0.0, 0.5, 1.0)
            chosen = row["mlp_dev_rates"][str(row["mlp_share_exponent"])]
            assert chosen == max(row["mlp_dev_rates"].values())  # chosen on dev prompts
    schedule = json.loads((out / "speculation_schedule.json").read_text())
    assert "not measured on vLLM" in schedule["measured_with"]
    fp32 = schedule["compressions"]["fp32"]
    best = {int(b): g for b, g in summary["compressions"]["fp32"]["best_gamma"].items()}
    if max(best.values()) == 0:
        assert fp32["vllm_speculative_config"] is None
    else:
        assert fp32["vllm_speculative_config"]["num_speculative_tokens"] == max(best.values())
