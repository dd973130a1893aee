"""Where named models live: $SPECKV_MODELS_DIR, else the checkout's models/, else the user's cache — never
the installed package's directory; and the engine resolves `default` through its entry point."""

from __future__ import annotations

from pathlib import Path

import pytest
from speckv.data.models import (
    DRAFT_DIRNAME,
    FEATURE_DRAFT_DIRNAME,
    MARKER,
    TARGET_DIRNAME,
    checkout_root,
    models_dir,
)
from speckv.profiling.errors import SpeckvError
from speckv.profiling.models import resolve_source


def _checkout(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "dvc.yaml").write_text("stages: {}\n")
    (root / "params.yaml").write_text("{}\n")
    return root


def test_the_environment_variable_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECKV_MODELS_DIR", str(tmp_path / "mine"))
    monkeypatch.chdir(_checkout(tmp_path / "repo"))
    assert models_dir() == tmp_path / "mine"


def test_a_checkout_keeps_models_beside_its_dvc_yaml(tmp_path, monkeypatch):
    monkeypatch.delenv("SPECKV_MODELS_DIR", raising=False)
    repo = _checkout(tmp_path / "repo")
    (repo / "sub" / "deeper").mkdir(parents=True)
    monkeypatch.chdir(repo / "sub" / "deeper")
    assert checkout_root() == repo.resolve()
    assert models_dir() == repo.resolve() / "models"


def test_outside_a_checkout_models_go_to_the_user_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("SPECKV_MODELS_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "plain").mkdir()
    monkeypatch.chdir(tmp_path / "plain")
    assert checkout_root() is None
    assert models_dir() == tmp_path / "cache" / "speckv" / "models"
    import speckv

    assert not str(models_dir()).startswith(str(Path(speckv.__file__).parent.parent))


def test_the_engine_resolves_default_through_the_entry_point(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECKV_MODELS_DIR", str(tmp_path))
    for name in (TARGET_DIRNAME, DRAFT_DIRNAME, FEATURE_DRAFT_DIRNAME):
        (tmp_path / name).mkdir()
        (tmp_path / name / MARKER).write_text("{}\n")
    assert resolve_source("default", "target").path == str(tmp_path / TARGET_DIRNAME)
    assert resolve_source("default", "draft").path == str(tmp_path / FEATURE_DRAFT_DIRNAME)
    assert resolve_source("default-standalone", "draft").path == str(tmp_path / DRAFT_DIRNAME)
    (tmp_path / FEATURE_DRAFT_DIRNAME / MARKER).unlink()
    with pytest.raises(SpeckvError, match="dvc repro distill"):
        resolve_source("default", "draft")


def test_an_unknown_bare_name_is_neither_a_path_nor_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SpeckvError, match="neither a local path nor a hub id"):
        resolve_source("no-such-model", "target")
