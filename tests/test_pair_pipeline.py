"""A user's own pair from `speckv pair add --quick` to its report, through DVC, on a copy of the repository."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from repo_modules import FOLDERS, ROOT
from test_dvc_deps import resolved_stages
from tiny import save_pair


@pytest.mark.slow  # the whole pipeline of the tiny pair under DVC: about five minutes on 2 busy cores
def test_a_quick_pair_runs_from_pair_add_to_its_report(tmp_path):
    repo = tmp_path / "repo"
    for package in FOLDERS:
        shutil.copytree(ROOT / package, repo / package, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / name, repo / name)
    target, draft = save_pair(tmp_path / "models", chat_template=False)
    env = {k: v for k, v in os.environ.items() if k not in ("SPECKV_MODELS_DIR", "MLFLOW_TRACKING_URI")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"

    def run(*argv: str) -> str:
        done = subprocess.run(argv, cwd=repo, env=env, capture_output=True, text=True, timeout=1200)
        assert done.returncode == 0, f"{shlex.join(argv)} failed:\n{done.stderr[-3000:]}"
        return done.stdout

    run(sys.executable, "-m", "dvc", "init", "--no-scm", "-q")
    before = resolved_stages(repo)
    add = ["pair", "add", "tiny2", "--target", str(target), "--draft", str(draft), "--no-chat-template"]
    command = run(sys.executable, "-m", "speckv.pipeline.cli", *add, "--quick").strip().splitlines()[-1]
    assert command == "dvc repro report@tiny2"
    run(sys.executable, "-m", *shlex.split(command))

    out = repo / "artifacts" / "tiny2" / "report"
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"live", "replay"} <= set(metrics), sorted(metrics)
    assert (out / "report.html").stat().st_size > 0
    # the other pairs' stages are as they were, and nothing of theirs was written
    after = resolved_stages(repo)
    assert {name: after[name] for name in before} == before
    assert [p.name for p in (repo / "artifacts").iterdir()] == ["tiny2"]
    assert json.loads(run(sys.executable, "-m", "dvc", "status", "report@tiny2", "--json")) == {}
