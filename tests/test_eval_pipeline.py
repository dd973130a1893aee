import json

import pandas as pd
import pytest
import yaml
from eval_synthetic import replay_only_config, write_costs, write_mlp_export, write_traces
from speckv.pipeline.cli import main
from speckv.pipeline.config import ConfigError, from_dict
from speckv.predictor.evaluation.evaluate import EvaluateConfig, alias_version, promotion
from speckv.predictor.evaluation.report import ReportConfig, build_report
from speckv.predictor.registry import log_training_run, promote
from speckv.profiling.errors import SpeckvError
from tiny import char_tokenizer


def write_prompts(path, tasks=("code", "chat"), per_split=2):
    tok = char_tokenizer()
    with path.open("w") as f:
        for task in tasks:
            for split in ("dev", "test"):
                for j in range(per_split):
                    text = f"{task} prompt {j}:"
                    ids = tok(text, add_special_tokens=False)["input_ids"]
                    row = {
                        "prompt_id": f"{task}/{split}{j}",
                        "task": task,
                        "split": split,
                        "text": text,
                        "input_ids": ids,
                        "n_tokens": len(ids),
                        "orig_tokens": len(ids),
                        "truncated": False,
                    }
                    f.write(json.dumps(row) + "\n")
    return path


def test_evaluate_and_report_end_to_end(tmp_path, tiny_pair_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    target_dir, draft_dir = tiny_pair_dir
    # the live prompts' own test traces, as long as the live runs, so replay can be set against them
    timed = tuple((f"{t}/test{j}", t, "test", 12) for t in ("code", "chat") for j in range(2))
    write_traces(tmp_path / "traces", splits=("train", "dev", "test"), extra=timed)
    write_costs(tmp_path / "calibrate")
    write_mlp_export(tmp_path / "export")
    params = {
        "evaluate": {
            "traces_dir": "traces",
            "calibrate_dir": "calibrate",
            "export_dir": "export",
            "prompts": str(write_prompts(tmp_path / "prompts.jsonl")),
            "out_dir": "eval",
            "target": str(target_dir),
            "draft": str(draft_dir),
            "device": "cpu",
            "gamma_max": 6,
            "threshold_grid": [0.3, 0.6],
            "entropy_grid": [0.5, 1.5],
            "live_controllers": {
                "fp32": [
                    "none",
                    "fixed:4",
                    "best-fixed",
                    "threshold:best",
                    "paper",
                    "mlp",
                    "hf-assisted",
                    "hf-threshold",
                ]
            },
            "live_per_task": 1,
            "max_new_tokens": 12,
            "warmup_tokens": 2,
            "n_boot": 200,
            "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
            "overhead_calls": 500,
        },
        "report": {
            "eval_dir": "eval",
            "predictor_dir": "predictor",
            "calibrate_dir": "calibrate",
            "out_dir": "report",
        },
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert main(["evaluate"]) == 0
    live = pd.read_parquet(tmp_path / "eval" / "live.parquet")
    roles = {"none", "fixed:4", "best-fixed", "threshold:best", "paper", "mlp", "hf-assisted", "hf-threshold"}
    assert set(live["policy"]) == roles
    assert live.loc[~live["policy"].str.startswith("hf-"), "matches_none"].all()
    replay = pd.read_parquet(tmp_path / "eval" / "replay.parquet")
    assert {
        "oracle",
        "mlp",
        "paper",
        "best-fixed",
        "threshold:tuned",
        "threshold:tuned+trim",
        "entropy:tuned",
        "entropy:tuned+trim",
        "first-token-oracle",
    } <= set(replay["policy"])
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    shares = summary["replay"]["gap_share"]
    assert {"mlp", "first-token-oracle", "threshold:tuned+trim"} <= set(shares)
    assert {"all", "fp32", "int8", "fp32/code", "int8/chat"} <= set(shares["mlp"])
    # the synthetic first-token acceptance follows the target's confidence, which only hindsight knows
    # exactly: knowing the first token's fate closes part of the gap, and never more than the oracle
    assert 0 < shares["first-token-oracle"]["all"]["share"] <= 1
    # MLP ÷ each causal rival: the same paired ratio as the best-fixed table's, seen from the MLP
    versus = summary["replay"]["test"]["mlp_vs"]
    assert {"all", "fp32", "int8"} <= set(versus) and "oracle" not in versus["all"]
    table = summary["replay"]["test"]["vs_best_fixed"]["all"]["mlp"]["vs_best-fixed"]
    assert versus["all"]["best-fixed"]["ratio"] == pytest.approx(table["ratio"])

    assert main(["report"]) == 0
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    # each headline speedup is the pooled decode-phase tokens/s of the MLP's live runs over the base's,
    # inside its CI; the end-to-end figures are the same over all tokens and the whole wall time
    by = live.groupby("policy")
    phases = {
        "live": by["decode_tokens"].sum() / by["decode_s"].sum(),
        "live_e2e": by["new_tokens"].sum() / by["wall_s"].sum(),
    }
    for section, rate in phases.items():
        for base, key in (("best-fixed", "best_fixed"), ("fixed:4", "fixed4"), ("none", "none")):
            speedup = metrics[section][f"speedup_mlp_vs_{key}"]
            assert speedup == pytest.approx(rate["mlp"] / rate[base], rel=1e-6)
            low, high = (metrics[section][f"speedup_mlp_vs_{key}_{end}"] for end in ("low", "high"))
            assert low <= speedup <= high
    assert metrics["live"]["lossless"] is True
    # a run's time splits at its first token, for transformers' runs too
    assert (live["ttft_s"] > 0).all() and (live["decode_s"] > 0).all()
    assert (live["ttft_s"] + live["decode_s"]).to_numpy() == pytest.approx(live["wall_s"].to_numpy())
    assert set(metrics["live"]["ttft_s"]) == roles
    # replay set against every live run of our loop, on the same prompts
    fidelity = summary["fidelity"]
    assert {(r["compression"], r["policy"]) for r in fidelity["table"]} == {
        ("fp32", r) for r in roles if not r.startswith("hf-")
    }
    assert all(r["prompts"] == 2 for r in fidelity["table"])
    errors = [abs(r["ratio"] - 1) for r in fidelity["table"]]
    assert metrics["fidelity"]["max_abs_error"] == pytest.approx(max(errors))
    assert metrics["fidelity"]["ratio_max_abs_error"] == pytest.approx(
        max(abs(r["vs_none_ratio"] - 1) for r in fidelity["table"] if r["policy"] != "none")
    )
    # the table's clock is the cost model measured beside the live runs (dev prompts, every fixed gamma and
    # the alternating runs);
    # the calibrate stage's model is replayed against the same runs, and the machine's drift between them
    assert fidelity["cost_model"] == "measured beside the live runs"
    measured = summary["live_cost_models"]["fp32"]
    assert len(measured["step_ms"]) == 7 and measured["meta"]["prompt_tokens"]
    # every dev prompt at every gamma 0..6 and both alternating runs, over all the blocks
    assert measured["meta"]["runs"] == 4 * 9 and measured["meta"]["fit"]["switch"]["steps"][0] > 0
    tuning = fidelity["tuning_model"]
    assert [(r["compression"], r["policy"]) for r in tuning["table"]] == [
        (r["compression"], r["policy"]) for r in fidelity["table"]
    ]
    assert metrics["fidelity"]["tuning_model"]["max_abs_error"] == pytest.approx(
        max(abs(r["ratio"] - 1) for r in tuning["table"])
    )
    stage = json.loads((tmp_path / "calibrate" / "fp32.json").read_text())
    drift = fidelity["drift"]["fp32"]
    at = stage["context_tokens"]
    for g in (0, 6):
        live_step = measured["step_ms"][g] + measured["step_ms_per_token"][g] * (
            at - measured["context_tokens"]
        )
        assert drift["step_ratio"][g] == pytest.approx(live_step / stage["step_ms"][g])
    # a policy's measured tokens/s does not depend on the clock replay is read with
    assert [r["measured_tokens_per_s"] for r in tuning["table"]] == pytest.approx(
        [r["measured_tokens_per_s"] for r in fidelity["table"]]
    )
    # the gap share is (MLP - best fixed) / (oracle - best fixed) in pooled test tokens/s
    replay_ = metrics["replay"]
    closed = (replay_["speedup_mlp_vs_best_fixed"] - 1) / (replay_["speedup_oracle_vs_best_fixed"] - 1)
    assert replay_["oracle_gap_share"] == pytest.approx(closed)
    assert metrics["overhead"]["decision_ms"] < 1.0  # a drafted token costs tens of ms; a decision far less
    report = (tmp_path / "report" / "report.md").read_text().splitlines()
    assert "predictor" in report[0] and "pay" in report[2]
    assert "MLP vs best-fixed" in "\n".join(report[:12])
    page = (tmp_path / "report" / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 4


def dev_frame(mlp_ms: float) -> pd.DataFrame:
    rows = []
    for i in range(12):
        jitter = 1.0 + 0.01 * (i % 3)
        rows.append(
            {
                "compression": "fp32",
                "prompt_id": f"p{i}",
                "policy": "best-fixed",
                "new_tokens": 50,
                "model_ms": 1000.0 * jitter,
            }
        )
        rows.append(
            {
                "compression": "fp32",
                "prompt_id": f"p{i}",
                "policy": "mlp",
                "new_tokens": 50,
                "model_ms": mlp_ms * jitter,
            }
        )
    return pd.DataFrame(rows)


@pytest.mark.slow  # MLflow round trips
def test_promotion_gate(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    export = write_mlp_export(tmp_path / "export")
    log_training_run({}, {"x": 1.0}, [], export, uri=uri, artifact_location=str(tmp_path / "mlartifacts"))
    log_training_run({}, {"x": 2.0}, [], export, uri=uri, artifact_location=str(tmp_path / "mlartifacts"))
    promote("1", uri=uri)  # the previous champion
    config = EvaluateConfig(tracking_uri=uri, n_boot=300)

    worse = promotion(dev_frame(1100.0), config)
    assert not worse["promoted"] and "previous champion stays" in worse["reason"]
    assert alias_version("champion", uri) == "1"

    better = promotion(dev_frame(800.0), config)
    assert better["promoted"] and better["version"] == "2"
    assert alias_version("champion", uri) == "2"
    assert alias_version("nope", uri) is None


def test_bad_inputs_fail_clearly(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(EvaluateConfig, {"gamma": 3}, "evaluate")
    with pytest.raises(SpeckvError, match="including none"):
        EvaluateConfig(live_controllers={"fp32": ["mlp"]})
    with pytest.raises(SpeckvError, match="threshold_grid"):
        EvaluateConfig(threshold_grid=[1.5])
    with pytest.raises(SpeckvError, match="no evaluation summary"):
        build_report(ReportConfig(eval_dir="missing"))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"evaluate": {"traces_dir": "nowhere"}}))
    assert main(["evaluate", "--no-live"]) == 2
    write_traces(tmp_path / "traces", compressions=("fp32",))
    params = {"evaluate": {"traces_dir": "traces", "calibrate_dir": "calibrate", "gamma_max": 6}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert main(["evaluate", "--no-live"]) == 2  # no cost models
    write_costs(tmp_path / "calibrate", compressions=("fp32",))
    assert main(["evaluate", "--no-live"]) == 2  # no predictor export


def test_replay_only_with_a_smaller_gamma_max(tmp_path):
    from speckv.predictor.evaluation.evaluate import run_evaluation

    settings = {"gamma_max": 4, "threshold_grid": [0.5], "entropy_grid": [1.0], "n_boot": 100}
    config = replay_only_config(tmp_path, 2, ("fp32",), **settings)
    summary = run_evaluation(config)
    replay = pd.read_parquet(tmp_path / "eval" / "replay.parquet")
    assert max(max(g) for g in replay["gammas"]) == 4
    assert "live" not in summary and pd.read_parquet(tmp_path / "eval" / "live.parquet").empty
    assert not summary["promotion"]["promoted"]
