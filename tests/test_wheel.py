"""The built wheel installs one `speckv` namespace: imported in a fresh venv outside the checkout, its public
surface works, its entry points resolve, and no top-level `data`, `pipeline`, `predictor` or `profiling`
module is installed."""

from __future__ import annotations

import json
import site
import subprocess
import sys
import venv
import zipfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CHECK = """
import importlib.util, json, sys
import speckv
from speckv.profiling import plugins
from speckv.data.prompts import SUITES_DIR
out = {
    "file": speckv.__file__,
    "fixed": speckv.controller("fixed:3", 8).name,
    "controllers": plugins.names("speckv.controllers"),
    "models": plugins.names("speckv.models"),
    "suites": sorted(p.name for p in SUITES_DIR.glob("*.jsonl")),
    "template": importlib.util.find_spec("speckv.predictor.evaluation") is not None,
    "top_level": [m for m in ("data", "pipeline", "predictor", "profiling") if importlib.util.find_spec(m)],
}
print(json.dumps(out))
"""


def _setuptools_major() -> int:
    try:
        return int(version("setuptools").split(".")[0])
    except PackageNotFoundError:
        return 0


@pytest.mark.slow  # builds the wheel (~20 s)
def test_wheel_installs_one_namespace(tmp_path):
    wheels = tmp_path / "wheels"
    # the venv's own setuptools when it meets pyproject's build requirement, else pip's isolated build
    isolation = [] if _setuptools_major() >= 68 else ["--use-pep517"]
    if not isolation:
        isolation = ["--no-build-isolation"]
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation, "-w", str(wheels), str(ROOT)],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    (wheel,) = wheels.glob("speckv-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        tops = {name.split("/")[0] for name in zf.namelist()}
        names = set(zf.namelist())
    assert tops == {"speckv", wheel.name.split("-py")[0] + ".dist-info"}, tops
    assert "speckv/predictor/evaluation/templates/report.html.j2" in names
    assert "speckv/data/splits.json" in names

    # A fresh venv; the test interpreter's site-packages lends the heavy dependencies (torch, transformers)
    # as a plain path entry, so this checkout's editable install is not active there.
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(purelib)  # a wheel is a zip laid out for site-packages (what pip install does)
    (Path(purelib) / "zz_deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    done = subprocess.run([str(python), "-c", CHECK], cwd=outside, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["file"].startswith(purelib), out["file"]
    assert out["fixed"] == "fixed:3"
    assert "mlp" in out["controllers"] and "default" in out["models"]
    assert len(out["suites"]) == 4 and out["template"]
    assert out["top_level"] == []
