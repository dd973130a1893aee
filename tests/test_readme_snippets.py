"""README's code blocks that use the trained predictor run as written: CLI, transformers' generate(), SpecKV's
own API and the MLflow generator, in a stand-in checkout whose `default` models are the tiny pair.

Blocks are found by what they do, not by their place in README: each route is the one block holding its
marker, and every Python block must be one of the routes, so none goes untested."""

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
# route -> (language, text only that route's block holds)
ROUTES = {
    "cli": ("bash", "speckv generate"),
    "generate": ("python", "custom_generate=speckv.assisted("),
    "api": ("python", "speckv.load_pair("),
    "mlflow": ("python", "pyfunc.load_model("),
}


def blocks() -> list[tuple[str, str]]:
    """(language, code) of every fenced bash/python block in README."""
    text = (ROOT / "README.md").read_text()
    return re.findall(r"^```(bash|python)\n(.*?)^```", text, flags=re.S | re.M)


def snippet(route: str) -> str:
    lang, marker = ROUTES[route]
    found = [code for language, code in blocks() if language == lang and marker in code]
    assert len(found) == 1, f"README should hold one {lang} block with {marker!r}, found {len(found)}"
    return found[0]


@pytest.mark.parametrize("route", ROUTES)
def test_readme_shows_the_route(route):
    snippet(route)


def test_every_python_block_is_a_tested_route():
    markers = [marker for lang, marker in ROUTES.values() if lang == "python"]
    untested = [code for lang, code in blocks() if lang == "python" and not any(m in code for m in markers)]
    assert not untested, f"README Python blocks no test runs: {untested}"


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
@pytest.mark.parametrize("route", ROUTES)
def test_snippet_runs_as_written(checkout, route):
    lang, code = ROUTES[route][0], snippet(route)
    env = {k: v for k, v in os.environ.items() if k not in ("SPECKV_MODELS_DIR", "MLFLOW_TRACKING_URI")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    argv = ["bash", "-euo", "pipefail", "-c", code] if lang == "bash" else [sys.executable, "-c", code]
    done = subprocess.run(argv, cwd=checkout, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"README {route} snippet failed:\n{done.stderr[-3000:]}"
    assert done.stdout.strip(), f"README {route} snippet printed nothing"
