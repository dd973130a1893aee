"""The `mlp:REF` controller kind, registered with the engine as the `speckv.controllers` entry point `mlp`.

REF is an export directory or a registry URI `models:/NAME@ALIAS`. An export is loaded once per directory
(and reloaded when its files change), so building many controllers — one per prompt in an evaluation — costs
one load.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from speckv.predictor.runtime import MODELS_URI_PREFIX, AcceptancePredictor, MLPController, load_export


def resolve_export_dir(ref: str) -> Path:
    """A local export directory, or `models:/NAME@ALIAS` downloaded from the MLflow registry."""
    if ref.startswith(MODELS_URI_PREFIX):
        from speckv.predictor.registry import download_export  # MLflow only for registry references

        return download_export(ref)
    return Path(ref)


@lru_cache(maxsize=8)
def _cached_export(path: str, stamp: tuple) -> AcceptancePredictor:
    return load_export(path)


def shared_export(export_dir: str | Path) -> AcceptancePredictor:
    """`load_export`, cached per directory and the modification times of its files."""
    path = Path(export_dir).resolve()
    stamp = tuple(sorted((f.name, f.stat().st_mtime_ns) for f in path.iterdir())) if path.is_dir() else ()
    return _cached_export(str(path), stamp)


def load_mlp_controller(ref: str, gamma_max: int, compression: str) -> MLPController:
    """The `mlp:REF` controller with the export's own stop rule, for one compression."""
    predictor = shared_export(resolve_export_dir(ref))
    return MLPController(predictor, gamma_max=gamma_max, compression=compression, name=f"mlp:{ref}")


def mlp_controller(arg: str, gamma_max: int, compression: str) -> MLPController:
    """The entry point the engine's `parse_controller` calls for `mlp:ARG`."""
    return load_mlp_controller(arg, gamma_max, compression)
