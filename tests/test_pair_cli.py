"""`speckv pair add/list/remove` on a copy of params.yaml and dvc.yaml: a good pair becomes stages DVC resolves,
a bad one is one error line and an unchanged params file."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from repo_modules import ROOT
from speckv.pipeline.cli import main
from speckv.pipeline.config import PAIR_SECTIONS, load_params, pair_section
from test_dvc_deps import resolved_stages
from tiny import save_pair


@pytest.fixture
def checkout(tmp_path, monkeypatch) -> Path:
    """dvc.yaml and params.yaml of the repository in a scratch DVC project (no git), the working directory."""
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / name, tmp_path / name)
    (tmp_path / ".dvc").mkdir()
    (tmp_path / ".dvc" / "config").write_text("[core]\n    no_scm = true\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="module")
def plain_pair(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny base-model pair: its tokenizer has no chat template."""
    return save_pair(tmp_path_factory.mktemp("plain"), chat_template=False)


def test_add_writes_an_entry_dvc_runs_and_remove_restores_the_file(checkout, plain_pair, capsys):
    target, draft = plain_pair
    before = (checkout / "params.yaml").read_text()
    argv = ["pair", "add", "tiny2", "--target", str(target), "--draft", str(draft), "--no-chat-template"]
    assert main([*argv, "--quick"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "dvc repro report@tiny2"
    after = (checkout / "params.yaml").read_text()
    assert after.startswith(before.rstrip("\n"))  # the file's comments and other entries are untouched
    params = load_params(checkout / "params.yaml")
    entry = params["pairs"]["tiny2"]
    assert entry["artifacts"] == "artifacts/tiny2"
    assert entry["target_weights"] == str(target / "model.safetensors")
    assert entry["tokenizer"] == str(target / "tokenizer.json")
    prompts = pair_section(params, "prompts", "tiny2")
    assert prompts["chat"] is False and prompts["out"] == "artifacts/tiny2/prompts/prompts.jsonl"
    assert pair_section(params, "serve", "tiny2")["chat"] is False
    assert pair_section(params, "profile", "tiny2")["compressions"] == ["fp32", "int8"]
    assert pair_section(params, "train", "tiny2")["experiment"] == "speckv-train-tiny2"
    assert pair_section(params, "evaluate", "tiny2")["promote"] is False

    stages = resolved_stages(checkout)
    report = stages["report@tiny2"]
    assert report["cmd"] == "speckv report --pair tiny2"
    assert "artifacts/tiny2/report/metrics.json" in [next(iter(m)) for m in report["metrics"]]
    assert str(target / "model.safetensors") in stages["calibrate@tiny2"]["deps"]
    assert {f"pairs.tiny2.{s}" for s in ("artifacts", "evaluate")} <= set(stages["evaluate@tiny2"]["params"])

    assert main(["pair", "list"]) == 0
    listed = capsys.readouterr().out
    assert (
        "tiny2: target" in listed and "plain-text prompts" in listed and "default: target default" in listed
    )

    assert main(["pair", "remove", "tiny2"]) == 0
    assert (checkout / "params.yaml").read_text() == before
    assert "report@tiny2" not in resolved_stages(checkout)


def test_add_without_quick_keeps_the_default_amounts(checkout, plain_pair):
    target, draft = plain_pair
    args = ["pair", "add", "full", "--target", str(target), "--draft", str(draft), "--no-chat-template"]
    assert main([*args, "--draft-compression", "same"]) == 0
    params = load_params(checkout / "params.yaml")
    for section in PAIR_SECTIONS:
        config = pair_section(params, section, "full")
        assert config.get("compressions", params[section].get("compressions")) == params[section].get(
            "compressions"
        )
    assert pair_section(params, "calibrate", "full")["draft_compression"] == "same"
    assert pair_section(params, "evaluate", "full")["live_per_task"] == params["evaluate"]["live_per_task"]


def _refused(checkout: Path, capsys, argv: list[str], message: str) -> None:
    before = (checkout / "params.yaml").read_text()
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert (checkout / "params.yaml").read_text() == before
    assert not (checkout / "artifacts").exists()


def test_a_bad_add_is_one_line_and_writes_nothing(checkout, plain_pair, tmp_path, capsys):
    target, draft = plain_pair
    add = ["pair", "add", "tiny2", "--no-chat-template"]
    _refused(
        checkout, capsys, [*add, "--target", str(tmp_path / "nowhere"), "--draft", str(draft)], "not found"
    )
    other_vocab, _ = save_pair(tmp_path / "small", vocab_size=96)
    _refused(
        checkout,
        capsys,
        [*add, "--target", str(target), "--draft", str(other_vocab)],
        "do not share a vocabulary",
    )
    models = ["--target", str(target), "--draft", str(draft)]
    _refused(checkout, capsys, ["pair", "add", "tiny2", *models], "has no chat template")
    _refused(checkout, capsys, [*add[:2], "qwen-coder", *add[3:], *models], "pass --force")
    _refused(checkout, capsys, [*add[:2], "default", *add[3:], *models], "cannot be replaced")
    _refused(checkout, capsys, [*add[:2], "calibrate", *add[3:], *models], "not allowed")
    _refused(checkout, capsys, [*add[:2], "Bad@name", *add[3:], *models], "not allowed")
    _refused(checkout, capsys, ["pair", "remove", "tiny2"], "no pair 'tiny2'")
    _refused(checkout, capsys, ["pair", "remove", "default"], "cannot be removed")


def test_force_replaces_an_existing_pair(checkout, plain_pair):
    target, draft = plain_pair
    argv = ["pair", "add", "qwen-coder", "--target", str(target), "--draft", str(draft), "--no-chat-template"]
    assert main([*argv, "--force"]) == 0
    entry = yaml.safe_load((checkout / "params.yaml").read_text())["pairs"]["qwen-coder"]
    assert entry["draft_weights"] == str(draft / "model.safetensors")
    assert entry["artifacts"] == "artifacts/qwen-coder"


def test_a_stage_for_an_unknown_pair_is_one_error_line(checkout, capsys):
    _refused(checkout, capsys, ["prompts", "--pair", "nope"], "no pair 'nope'")
