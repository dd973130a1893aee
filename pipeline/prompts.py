"""`speckv prompts`: tokenize the prompt suites for the target into artifacts/prompts/prompts.jsonl."""

from __future__ import annotations

import argparse
import logging
from collections import Counter
from pathlib import Path

from speckv.data.prompts import PromptsConfig, build_prompt_file, check_splits
from speckv.pipeline.config import load_section, stage_parser
from speckv.profiling.models import load_tokenizer

log = logging.getLogger(__name__)


def run(args: argparse.Namespace) -> int:
    config = load_section(PromptsConfig, "prompts", args.params, args.pair)
    check_splits()
    tokenizer = load_tokenizer(config.target)  # any model reference: a pair name, directory, .gguf or hub id
    rows = build_prompt_file(tokenizer, Path(config.out), config.chat, config.max_prompt_tokens, config.tasks)
    counts = Counter((r["task"], r["split"]) for r in rows)
    truncated = sum(r["truncated"] for r in rows)
    log.info("wrote %d prompts to %s (%d truncated): %s", len(rows), config.out, truncated, dict(counts))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    summary = "tokenize the prompt suites with their train/dev/test split"
    stage_parser(subparsers, "prompts", summary, "section `prompts:`", run)
