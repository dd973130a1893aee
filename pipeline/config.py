"""Stage configs: one dataclass per params.yaml section, unknown keys rejected, types checked."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml
from speckv.profiling.errors import SpeckvError

T = TypeVar("T")


# The stage sections a pair's entry overlays; the distill section belongs to the default pair alone.
PAIR_SECTIONS = ("prompts", "calibrate", "profile", "train", "serve", "evaluate", "report", "batch")
# Sections of commands outside dvc.yaml (optional engines): a pair's entry may overlay them, or leave them out.
OPTIONAL_PAIR_SECTIONS = ("llamacpp",)
# The default sections' output paths start with this directory; a pair's start with its `artifacts` instead.
ARTIFACTS = "artifacts"


class ConfigError(SpeckvError):
    """A params file or section that does not match its stage's dataclass."""


def _check_type(name: str, value: Any, annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            try:
                return _check_type(name, value, arg)
            except ConfigError:
                continue
        raise ConfigError(f"{name}: {value!r} is not {annotation}")
    if annotation is type(None):
        if value is None:
            return None
        raise ConfigError(f"{name}: expected null, got {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        return [_check_type(f"{name}[{i}]", v, inner) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        return dict(value)
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: expected true/false, got {value!r}")
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type[T], raw: dict[str, Any] | None, section: str = "") -> T:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and values of the wrong type."""
    raw = dict(raw or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    where = f"[{section}] " if section else ""
    if unknown:
        raise ConfigError(f"{where}unknown key(s) {unknown}; allowed: {sorted(fields)}")
    kwargs = {}
    for key, value in raw.items():
        kwargs[key] = _check_type(f"{where}{key}", value, hints[key])
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{where}missing required key(s) {missing}")
    return cls(**kwargs)


def load_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections")
    return data


def load_section(cls: type[T], section: str, path: str | Path = "params.yaml", pair: str | None = None) -> T:
    """The `section` of params.yaml as a `cls` instance; with `pair`, as that entry of `pairs:` runs it."""
    params = load_params(path)
    if pair is None:
        return from_dict(cls, params.get(section), section)
    if section not in PAIR_SECTIONS + OPTIONAL_PAIR_SECTIONS:
        raise ConfigError(f"section {section!r} is the default pair's alone: run it without --pair")
    return from_dict(cls, pair_section(params, section, pair), f"pairs.{pair}: {section}")


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


@dataclasses.dataclass
class PairConfig:
    """One entry of params.yaml's `pairs:`: the pair's output directory, the model files its stages depend
    on (dvc.yaml lists them as deps), and per stage section only the keys that differ from that section."""

    artifacts: str  # every output of the pair goes under it (its sections' `artifacts/...` paths move here)
    tokenizer: str  # the target's tokenizer file (or the .gguf or directory holding it): a prompts dep
    target_weights: str  # the target's weights file or directory: a dep of every stage that loads the target
    draft_weights: str  # the draft's weights file or directory
    # weights of the causal draft that transformers' assisted generation (evaluate.hf_draft) and the batched
    # loop (batch.draft) run
    hf_draft_weights: str
    # Keys that replace the section's own, whole (a mapping replaces a mapping); {} when none differ, since
    # DVC tracks each of these by key and a missing one is an error there.
    prompts: dict[str, Any]
    calibrate: dict[str, Any]
    profile: dict[str, Any]
    train: dict[str, Any]
    serve: dict[str, Any]
    evaluate: dict[str, Any]
    report: dict[str, Any]
    batch: dict[str, Any]
    llamacpp: dict[str, Any] = dataclasses.field(default_factory=dict)  # `speckv llamacpp evaluate --pair`


def pair_config(params: dict[str, Any], pair: str) -> PairConfig:
    """Entry `pair` of the params' `pairs:` map, checked."""
    pairs = params.get("pairs") or {}
    if not isinstance(pairs, dict) or pair not in pairs:
        known = ", ".join(pairs) if isinstance(pairs, dict) else ""
        raise ConfigError(f"no pair {pair!r} in the params' `pairs:`; known pairs: {known or 'none'}")
    return from_dict(PairConfig, pairs[pair], f"pairs.{pair}")


def _rebase(value: Any, artifacts: str) -> Any:
    if isinstance(value, str) and (value == ARTIFACTS or value.startswith(ARTIFACTS + "/")):
        return artifacts + value[len(ARTIFACTS) :]
    return value


def pair_section(params: dict[str, Any], section: str, pair: str) -> dict[str, Any]:
    """Section `section` as pair `pair` runs it: its output paths under the pair's `artifacts` directory, then
    the pair's own keys of that section in place of the section's."""
    entry = pair_config(params, pair)
    raw = params.get(section) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"[{section}] must be a mapping, got {raw!r}")
    rebased = {key: _rebase(value, entry.artifacts) for key, value in raw.items()}
    return {**rebased, **getattr(entry, section)}


def command_actions(
    subparsers: argparse._SubParsersAction, name: str, help: str
) -> argparse._SubParsersAction:
    """The subcommands (ACTION) of a command `name` that groups several, e.g. `speckv models fetch`."""
    return subparsers.add_parser(name, help=help).add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )


def stage_parser(
    subparsers: argparse._SubParsersAction, name: str, help: str, sections: str, run
) -> argparse.ArgumentParser:
    """The command of one pipeline stage: `name` with --params (naming the params file's `sections`) and
    --pair, shared by every stage command; it runs `run(args)`."""
    parser = subparsers.add_parser(name, help=help)
    parser.add_argument("--params", default="params.yaml", help=f"params file ({sections})")
    parser.add_argument(
        "--pair",
        help="run for this entry of the params file's `pairs:` (dvc.yaml passes it): its own keys in place "
        "of the sections', outputs under its `artifacts` directory (default: the sections as written)",
    )
    parser.set_defaults(func=run)
    return parser
