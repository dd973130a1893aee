"""Named plugins the engine looks up without importing the layers above it.

The engine knows two kinds of names it cannot build itself: controller kinds (`mlp:...`, which the predictor
provides) and model names (`default`, which `speckv.data` resolves, fetching the embedded target). Packages
declare them as entry points (pyproject.toml: `speckv.controllers`, `speckv.models`); third-party packages can
add their own the same way. The engine imports nothing from `speckv.data`, `speckv.predictor` or
`speckv.pipeline`; the layering test checks it.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from importlib.metadata import entry_points

CONTROLLERS = (
    "speckv.controllers"  # name -> callable(arg: str, gamma_max: int, compression: str) -> Controller
)
MODELS = "speckv.models"  # name -> callable(role: str) -> str (a local path or hub id)


@cache
def _group(group: str) -> dict:
    return {ep.name: ep for ep in entry_points(group=group)}


def names(group: str) -> list[str]:
    """The plugin names installed for `group`, sorted."""
    return sorted(_group(group))


def find(group: str, name: str) -> Callable | None:
    """The callable registered as `name` in `group`, or None when no installed package declares it."""
    ep = _group(group).get(name)
    return ep.load() if ep is not None else None
