"""README's "Use the trained predictor" snippets run as written: CLI, transformers' generate(), SpecKV's own
API and the MLflow generator, in a stand-in checkout whose `default` models are the tiny pair."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from eval_synthetic import write_mlp_export

ROOT = Path(__file__).resolve().parents[1]


def snippets() -> list[tuple[str, str]]:
    """(language, code) of every fenced bash/python block in the section, in order."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Use the trained predictor", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(bash|python)\n(.*?)```", section, flags=re.S)


def test_the_section_has_the_three_routes():
    blocks = snippets()
    code = "\n".join(c for _, c in blocks)
    assert [lang for lang, _ in blocks] == ["bash", "python", "python", "python"]
    for needle in (
        "speckv generate",
        "custom_generate=speckv.assisted(",
        "speckv.load_pair(",
        "pyfunc.load_model(",
    ):
        assert needle in code


@pytest.fixture(scope="module")
def checkout(tmp_path_factory, tiny_pair_dir):
    """dvc.yaml + params.yaml (so `default` models live in its models/), the tiny pair as the default pair,
    an MLP export and a registry holding the predictor and the generator, as `make repro` leaves them."""
    import torch
    from speckv.data.feature_draft_training import build_feature_draft
    from speckv.data.models import DRAFT_DIRNAME, FEATURE_DRAFT_DIRNAME, MARKER, TARGET_DIRNAME
    from speckv.predictor.registry import log_training_run
    from transformers import AutoModelForCausalLM

    from speckv.serving_registry import register_generator

    root = tmp_path_factory.mktemp("checkout")
    (root / "dvc.yaml").write_text("stages: {}\n")
    (root / "params.yaml").write_text("{}\n")
    for src, name in zip(tiny_pair_dir, (TARGET_DIRNAME, DRAFT_DIRNAME), strict=True):
        shutil.copytree(src, root / "models" / name)
        (root / "models" / name / MARKER).write_text("{}\n")
    # the default draft is a feature draft of the tiny target (untrained: the snippets test plumbing)
    target = AutoModelForCausalLM.from_pretrained(tiny_pair_dir[0])
    feature_dir = root / "models" / FEATURE_DRAFT_DIRNAME
    build_feature_draft(target, torch.arange(target.config.vocab_size), 0).save(feature_dir)
    (feature_dir / MARKER).write_text("{}\n")
    export = write_mlp_export(
        root / "artifacts" / "predictor" / "export", ("fp32", "int8", "nf4"), gamma_max=8
    )
    old = Path.cwd()
    os.chdir(root)
    try:
        store = {"uri": "sqlite:///mlflow.db", "artifact_location": "mlartifacts"}
        log_training_run({}, {}, [], export, **store)
        register_generator(
            "models:/speckv-gamma-predictor@candidate", target="default", draft="default", **store
        )
    finally:
        os.chdir(old)
    return root


@pytest.mark.slow  # four fresh interpreters, each loading torch, transformers (and MLflow)
@pytest.mark.parametrize("index", range(4))
def test_snippet_runs_as_written(checkout, index):
    lang, code = snippets()[index]
    env = {k: v for k, v in os.environ.items() if k not in ("SPECKV_MODELS_DIR", "MLFLOW_TRACKING_URI")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    argv = ["bash", "-euo", "pipefail", "-c", code] if lang == "bash" else [sys.executable, "-c", code]
    done = subprocess.run(argv, cwd=checkout, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"README {lang} snippet {index} failed:\n{done.stderr[-3000:]}"
    assert done.stdout.strip(), f"README {lang} snippet {index} printed nothing"
