"""`speckv pair add/list/remove`: a draft/target pair as an entry of params.yaml's `pairs:`, which dvc.yaml's
stages run once per entry (`dvc repro report@NAME`)."""

from __future__ import annotations

import argparse
import io
import logging
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import transformers
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from speckv.data.pair_check import PairFiles, check_pair
from speckv.data.prompts import PromptsConfig
from speckv.pipeline.config import (
    ARTIFACTS,
    PAIR_SECTIONS,
    ConfigError,
    command_actions,
    from_dict,
    pair_section,
)
from speckv.predictor.evaluation.batch_eval import BatchConfig
from speckv.predictor.evaluation.evaluate import EvaluateConfig
from speckv.predictor.evaluation.report import ReportConfig
from speckv.predictor.train import TrainConfig
from speckv.profiling.atomic import write_text
from speckv.profiling.errors import SpeckvError
from speckv.profiling.models import COMPRESSIONS
from speckv.profiling.stage_config import CalibrateConfig, ProfileConfig

from speckv.serving_schema import ServeConfig

NAME = re.compile(r"[a-z0-9][a-z0-9._-]*")
# The default pair's output directories under artifacts/: a pair named like one would write inside it.
RESERVED = {"prompts", "distill", "calibrate", "profile", "predictor", "eval", "report", "batch"}
CONFIGS = {
    "prompts": PromptsConfig,
    "calibrate": CalibrateConfig,
    "profile": ProfileConfig,
    "train": TrainConfig,
    "serve": ServeConfig,
    "evaluate": EvaluateConfig,
    "report": ReportConfig,
    "batch": BatchConfig,
}
# --quick: a smoke run of the whole pipeline in minutes, before the real one (fp32 and int8 only, a few
# prompts per task and split, short traces and live runs, fewer bootstrap resamples and shuffles).
QUICK: dict[str, dict[str, Any]] = {
    "calibrate": {"compressions": ["fp32", "int8"], "loop_prompts": 2, "max_new_tokens": 16, "repeats": 3},
    "profile": {
        "compressions": ["fp32", "int8"],
        "per_task": {},
        "max_new_tokens": 24,
        "trace_per_task": {"train": 3, "dev": 2, "test": 2},
        "trace_batch": 8,
    },
    "train": {"importance_repeats": 1},
    "evaluate": {
        "trace_max_new_tokens": 24,
        "max_new_tokens": 24,
        "live_controllers": {"fp32": ["none", "best-fixed", "mlp"], "int8": ["none", "best-fixed", "mlp"]},
        "live_per_task": 1,
        "live_calibration_prompts": 1,
        "live_calibration_tokens": 16,
        "n_boot": 200,
        "overhead_calls": 2000,
    },
    "batch": {
        "batch_sizes": [1, 2, 4],
        "live_batch_sizes": [1, 4],
        "gamma_max": 4,
        "dev_per_task": 1,
        "test_per_task": 2,
        "max_new_tokens": 24,
        "calibration_prompts": 2,
        "calibration_tokens": 12,
        "n_boot": 200,
    },
}


def _yaml() -> YAML:
    yaml = YAML()  # round trip: the params file keeps its comments, order and flow-style lists
    yaml.width = 4096  # long lines stay as written
    yaml.indent(mapping=2, sequence=4, offset=2)
    yaml.representer.add_representer(
        type(None), lambda representer, _: representer.represent_scalar("tag:yaml.org,2002:null", "null")
    )
    return yaml


def _load(path: Path) -> Any:
    if not path.is_file():
        raise ConfigError(f"params file not found: {path}")
    data = _yaml().load(path.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("pairs"), dict):
        raise ConfigError(f"{path} has no `pairs:` map")
    return data


def _save(path: Path, data: Any) -> None:
    out = io.StringIO()
    _yaml().dump(data, out)
    write_text(path, out.getvalue())


def _flow(value: Any, depth: int = 0) -> Any:
    """A new entry as the params file writes its own: the entry and its sections in block style, every list
    and every mapping inside a section in flow style (`[fp32, int8]`, `{train: 3, dev: 2}`)."""
    if isinstance(value, list):
        seq = CommentedSeq(_flow(v, depth + 1) for v in value)
        seq.fa.set_flow_style()
        return seq
    if isinstance(value, dict):
        out = CommentedMap((k, _flow(v, depth + 1)) for k, v in value.items())
        if depth >= 2 or not value:
            out.fa.set_flow_style()
        return out
    return value


def _ref(ref: str, root: Path) -> str:
    """A model reference as the stages (run from the params file's directory) reach it: a path relative to
    that directory when inside it, absolute when outside; a name or hub id as given."""
    path = Path(ref).expanduser()
    if not path.exists():
        return ref
    path = path.resolve()
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def pair_entry(
    name: str,
    target: str,
    draft: str,
    files: PairFiles,
    draft_compression: str | None,
    chat: bool,
    quick: bool,
) -> dict[str, Any]:
    """The `pairs:` entry of a new pair: its outputs under artifacts/NAME, its MLflow experiment, nothing
    registered, and the section keys that differ from the default pair's."""
    models = {"target": target, "draft": draft}
    compression = {"draft_compression": draft_compression} if draft_compression else {}
    plain = {} if chat else {"chat": False}
    sections = {
        "prompts": {"target": target, **plain},
        "calibrate": {**models, **compression},
        "profile": {**models, **compression},
        "train": {"experiment": f"speckv-train-{name}", "register": False},
        "serve": {**models, **plain},
        # transformers' assisted generation runs the pair's own draft; nothing of the pair is registered
        "evaluate": {**models, **compression, "hf_draft": None, "promote": False},
        "report": {},
        "batch": {**models, **compression},  # the batched loop runs the causal draft
    }
    if quick:
        for section, keys in QUICK.items():
            sections[section].update(keys)
    return {
        "artifacts": f"{ARTIFACTS}/{name}",
        "tokenizer": files.tokenizer,
        "target_weights": files.target_weights,
        "draft_weights": files.draft_weights,
        "hf_draft_weights": files.draft_weights,
        **sections,
    }


def run_add(args: argparse.Namespace) -> int:
    path = Path(args.params)
    data = _load(path)
    name = args.name
    if not NAME.fullmatch(name) or name in RESERVED:
        raise SpeckvError(
            f"pair name {name!r} is not allowed: lower-case letters, digits, '.', '_' and '-' "
            f"(starting with a letter or digit), and none of {', '.join(sorted(RESERVED))}"
        )
    if name == "default":
        raise SpeckvError("the default pair cannot be replaced")
    if name in data["pairs"] and not args.force:
        raise SpeckvError(f"pair {name!r} exists in {path}: pass --force to replace it")
    for role, ref in (("target", args.target), ("draft", args.draft)):
        parent = Path(ref).expanduser().parent
        if not Path(ref).expanduser().exists() and parent != Path() and parent.is_dir():
            raise SpeckvError(f"{role} {ref!r} not found: {parent} has no {Path(ref).name}")
    root = path.resolve().parent
    target, draft = _ref(args.target, root), _ref(args.draft, root)
    # the answer is one line, the pair's command or an error, without the loading log and progress bars
    if not args.verbose:
        logging.getLogger().setLevel(logging.WARNING)
    transformers.utils.logging.disable_progress_bar()
    files = check_pair(args.target, args.draft)
    if args.chat and not files.chat_template:
        raise SpeckvError(
            f"target {args.target!r} has no chat template: pass --no-chat-template to use the prompts as plain text"
        )
    files = replace(
        files,
        tokenizer=_ref(files.tokenizer, root),
        target_weights=_ref(files.target_weights, root),
        draft_weights=_ref(files.draft_weights, root),
    )
    entry = pair_entry(name, target, draft, files, args.draft_compression, args.chat, args.quick)
    plain = {**{k: v for k, v in data.items() if k != "pairs"}, "pairs": {name: entry}}
    for section in PAIR_SECTIONS:  # every stage's config as the pair runs it: unknown keys, wrong types
        from_dict(CONFIGS[section], pair_section(plain, section, name), f"pairs.{name}: {section}")
    data["pairs"][name] = _flow(entry)
    _save(path, data)
    print(f"added pair {name} to {path}; run it (outputs in {entry['artifacts']}/):")
    print(f"dvc repro report@{name}")
    return 0


def run_list(args: argparse.Namespace) -> int:
    path = Path(args.params)
    data = _load(path)
    for name in data["pairs"]:
        prompts = pair_section(data, "prompts", name)
        calibrate = pair_section(data, "calibrate", name)
        report = Path(pair_section(data, "report", name)["out_dir"]) / "report.html"
        print(
            f"{name}: target {calibrate['target']}, draft {calibrate['draft']}, "
            f"{'chat template' if prompts.get('chat', True) else 'plain-text prompts'}, "
            f"outputs {data['pairs'][name]['artifacts']}/ ({'report written' if report.is_file() else 'no report yet'})"
        )
    return 0


def run_remove(args: argparse.Namespace) -> int:
    path = Path(args.params)
    data = _load(path)
    if args.name == "default":
        raise SpeckvError("the default pair cannot be removed")
    if args.name not in data["pairs"]:
        raise SpeckvError(f"no pair {args.name!r} in {path}; known pairs: {', '.join(data['pairs'])}")
    artifacts = data["pairs"][args.name]["artifacts"]
    del data["pairs"][args.name]
    _save(path, data)
    print(f"removed pair {args.name} from {path}; its outputs stay in {artifacts}/")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    actions = command_actions(subparsers, "pair", "add, list or remove the pipeline's draft/target pairs")
    add = actions.add_parser(
        "add",
        help="add a pair to params.yaml's `pairs:` after checking it loads and decodes together",
        description="Load both models and their tokenizers (one clear error, and nothing written, if they "
        "cannot run as a pair), write the pair's entry to the params file and print the command that runs "
        "the whole pipeline on it. Its outputs go to artifacts/NAME/, its MLflow runs to the experiment "
        "speckv-train-NAME; nothing of it is registered.",
    )
    add.add_argument("name", metavar="NAME", help="the pair's name: stages calibrate@NAME, ... report@NAME")
    for role in ("target", "draft"):
        add.add_argument(
            f"--{role}",
            required=True,
            help="a local save_pretrained directory, a .gguf file, a hub id or a registered name",
        )
    add.add_argument(
        "--draft-compression",
        choices=["same", *COMPRESSIONS],
        help="same: the draft compressed with the target; default: the draft at its own dtype",
    )
    add.add_argument(
        "--no-chat-template",
        dest="chat",
        action="store_false",
        help="use the prompts as plain text (for base models whose tokenizer has no chat template)",
    )
    add.add_argument(
        "--quick",
        action="store_true",
        help="small amounts (fp32 and int8, a few prompts, short traces and live runs): a smoke run in minutes",
    )
    add.add_argument("--force", action="store_true", help="replace a pair of the same name")
    add.set_defaults(func=run_add)
    show = actions.add_parser("list", help="the pairs in params.yaml: models, prompts, outputs")
    show.set_defaults(func=run_list)
    remove = actions.add_parser("remove", help="remove a pair's entry (its outputs stay on disk)")
    remove.add_argument("name", metavar="NAME")
    remove.set_defaults(func=run_remove)
    for sub in (add, show, remove):
        sub.add_argument("--params", default="params.yaml", help="params file (its `pairs:` map)")
