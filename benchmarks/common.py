"""What the benchmarks on a real pair share: the arguments naming the pair and its prompts."""

from __future__ import annotations

import argparse


def add_pair_arguments(
    parser: argparse.ArgumentParser, split: str, per_task: int, max_new_tokens: int = 48
) -> None:
    """--target and --draft (names or paths, as `load_pair` takes them), the prompt stage's file, the split
    and how many prompts per task to take from it, and how many tokens to generate."""
    parser.add_argument("--target", default="default")
    parser.add_argument("--draft", default="default")
    parser.add_argument("--prompts", default="artifacts/prompts/prompts.jsonl")
    parser.add_argument("--split", default=split)
    parser.add_argument("--per-task", type=int, default=per_task)
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
