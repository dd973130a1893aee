"""The distill stages end to end on a tiny target: a loadable standalone or feature draft, cached teacher
data reused, bad settings refused before any work, and the bf16-less amounts."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import speckv.data.distill as distill_mod
import speckv.data.teacher as teacher_mod
import torch
from speckv.data.distill import DistillConfig, distill
from speckv.data.models import DRAFT_DIRNAME, TARGET_DIRNAME, is_complete
from speckv.profiling.errors import SpeckvError
from tiny import save_word_level_target, write_prompt_file
from transformers import AutoModelForCausalLM

# distillation in seconds on the word-level target: 3 sequences per task, 5 tokens each, one thread
SMALL = {
    "sequences_per_task": 3,
    "dev_per_task": 1,
    "test_per_task": 1,
    "max_new_tokens": 5,
    "gen_batch_size": 2,
    "restricted_vocab": 16,
    "batch_tokens": 32,
    "warmup_steps": 1,
    "threads": 1,
}


def small_config(**settings) -> DistillConfig:
    return DistillConfig(**{**SMALL, **settings})


def test_distill_tiny_target_writes_a_loadable_draft(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target_dir = save_word_level_target(tmp_path / "target")
    prompts = write_prompt_file(tmp_path / "prompts.jsonl")
    config = small_config(prompt_head_weight=0.5, steps=3)
    out_dir = tmp_path / "models" / DRAFT_DIRNAME
    teacher = tmp_path / "teacher.pt"
    metrics = distill(target_dir, prompts, out_dir, teacher, config)

    draft = AutoModelForCausalLM.from_pretrained(out_dir)
    assert draft.config.num_hidden_layers == 2 and is_complete(out_dir)
    assert draft(input_ids=torch.tensor([[1, 5, 6]])).logits.shape == (1, 3, 64)
    dev = metrics["agreement"]  # overall is pooled over tokens, not a mean of the per-task rates
    pooled = sum(dev["per_task"][t] * dev["tokens"][t] for t in dev["tokens"]) / sum(dev["tokens"].values())
    assert dev["overall"] == pytest.approx(pooled)
    assert set(metrics["agreement"]["per_task"]) == {"code", "math"}
    card = json.loads((out_dir / "agreement.json").read_text())
    # 2 distill prompts per task: a greedy response each, then one sampled repeat to reach 3 per task.
    assert card["n_train_prompts"] == 4 and card["n_train_sampled"] == 2
    assert card["train_sequences_per_task"] == {"code": 3, "math": 3}
    assert "agreement" in (out_dir / "README.md").read_text()

    # A second run reuses the cached teacher data instead of generating again.
    def no_generation(*args: object, **kwargs: object) -> None:
        raise AssertionError("teacher data regenerated")

    monkeypatch.setattr(teacher_mod, "generate_teacher_data", no_generation)
    again = distill(target_dir, prompts, out_dir, teacher, config)
    assert again["n_train_response_tokens"] == metrics["n_train_response_tokens"]


def test_distill_rejects_an_empty_split(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("")
    with pytest.raises(SpeckvError, match="lacks distill, dev or test"):
        distill(
            save_word_level_target(tmp_path / "target"),
            prompts,
            tmp_path / "out",
            tmp_path / "t.pt",
            DistillConfig(),
        )


def test_distill_rejects_a_bad_dtype_before_loading_anything(tmp_path: Path) -> None:
    with pytest.raises(SpeckvError, match="teacher_dtype"):
        distill(
            tmp_path / "absent",
            tmp_path / "p.jsonl",
            tmp_path / "o",
            tmp_path / "t.pt",
            DistillConfig(teacher_dtype="int8"),
        )


def test_distill_features_tiny_target_writes_a_loadable_feature_draft(tmp_path: Path) -> None:
    from speckv.data.feature_distill import distill_features
    from speckv.profiling.controllers import parse_controller
    from speckv.profiling.decode import DecodeConfig, speculative_generate
    from speckv.profiling.feature_draft import is_feature_draft
    from speckv.profiling.models import load_pair

    target_dir = save_word_level_target(tmp_path / "target")
    prompts = write_prompt_file(tmp_path / "prompts.jsonl")
    config = small_config(save_dtype="float32", feature_steps=3)
    out_dir = tmp_path / "models" / "draft-features"
    metrics = distill_features(target_dir, prompts, out_dir, tmp_path / "teacher.pt", config)
    assert is_complete(out_dir) and metrics["kind"] == "feature" and metrics["steps"] == 3
    assert set(metrics["agreement_test"]["per_task"]) == {"code", "math"}
    assert metrics["cost_ratio"] > 0 and "First-token agreement" in (out_dir / "README.md").read_text()
    pair = load_pair(str(target_dir), str(out_dir), "fp32", "cpu")
    assert is_feature_draft(pair.draft) and pair.draft.head_ids.numel() == 16
    result = speculative_generate(
        pair.target, pair.draft, [1, 5, 6, 7], parse_controller("fixed:3", 3), DecodeConfig(max_new_tokens=8)
    )
    assert result.new_tokens == 8 and result.drafted > 0
    with pytest.raises(SpeckvError, match="init layer"):
        distill_features(
            target_dir, prompts, out_dir, tmp_path / "teacher.pt", replace(config, feature_init_layer=9)
        )
    assert is_complete(out_dir)  # a refused run leaves the finished draft alone


def test_distill_features_cli_applies_its_flags_and_refuses_bad_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """`speckv models distill-features`: params.yaml's `distill:` section, overridden by the flags."""
    import yaml
    from speckv.data.models import MARKER
    from speckv.pipeline.cli import main

    models = tmp_path / "models"
    save_word_level_target(models / TARGET_DIRNAME)
    (models / TARGET_DIRNAME / MARKER).write_text("{}\n")
    monkeypatch.setenv("SPECKV_MODELS_DIR", str(models))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "artifacts" / "prompts").mkdir(parents=True)
    write_prompt_file(tmp_path / "artifacts" / "prompts" / "prompts.jsonl")
    distill = {**SMALL, "save_dtype": "float32", "feature_steps": 50}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"distill": distill}))
    out = tmp_path / "feature-out"
    assert main(["models", "distill-features", "--steps", "2", "--init-layer", "1", "--out", str(out)]) == 0
    card = json.loads((out / "agreement.json").read_text())
    assert is_complete(out) and card["steps"] == 2 and card["init_layer"] == 1  # the flags beat params.yaml
    assert str(out) in capsys.readouterr().out
    assert main(["models", "distill-features", "--steps", "0", "--out", str(tmp_path / "bad")]) == 2
    assert "feature_steps must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("native", [True, False])
def test_no_bf16_amounts_apply_only_on_cpus_without_native_bf16(
    native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("speckv.profiling.cpu.native_bf16", lambda: native)
    config = DistillConfig(steps=1000, feature_steps=2000, no_bf16={"steps": 300, "feature_steps": 900})
    resolved = distill_mod.resolve_config(config)
    assert resolved.no_bf16 == {}
    assert (resolved.steps, resolved.feature_steps) == ((1000, 2000) if native else (300, 900))
    assert resolved.train_autocast == ("bfloat16" if native else "float32")
    assert distill_mod.no_bf16_applied(config) == ({} if native else {"steps": 300, "feature_steps": 900})
    # A dtype set by hand is a choice of recipe: the amounts stay as written.
    forced = replace(config, teacher_dtype="float32", train_autocast="float32")
    assert distill_mod.resolve_config(forced).steps == 1000
    with pytest.raises(SpeckvError, match="no_bf16 may set only"):
        distill_mod.check_config(replace(config, no_bf16={"lr": 1}))
