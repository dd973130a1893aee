"""`speckv batch`: the best gamma at each batch size, batched cost models and the speculation schedule."""

from __future__ import annotations

import argparse
import logging

from speckv.pipeline.config import load_section, stage_parser
from speckv.predictor.evaluation.batch_eval import BatchConfig, run_batch

log = logging.getLogger(__name__)


def run(args: argparse.Namespace) -> int:
    config = load_section(BatchConfig, "batch", args.params, args.pair)
    summary = run_batch(config)
    for compression, section in summary["compressions"].items():
        log.info(
            "%s: best gamma by batch size %s; replay error up to %.1f%%",
            compression,
            section["best_gamma"],
            100 * section["fidelity_max_abs_error"],
        )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    stage_parser(
        subparsers,
        "batch",
        "gamma by batch size: batched costs measured, policies replayed and run live in batches",
        "section `batch:`",
        run,
    )
