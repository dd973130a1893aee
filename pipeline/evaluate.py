"""`speckv evaluate`: replay every policy on the traces, time a subset live, decide the promotion."""

from __future__ import annotations

import argparse
import logging

from speckv.pipeline.config import load_section, stage_parser
from speckv.predictor.evaluation.evaluate import EvaluateConfig, run_evaluation

log = logging.getLogger(__name__)


def run(args: argparse.Namespace) -> int:
    config = load_section(EvaluateConfig, "evaluate", args.params, args.pair)
    if args.no_live:
        config.live_controllers = {}
    summary = run_evaluation(config)
    share = summary["replay"]["oracle_gap_share"]
    log.info("test replay: MLP closes %.0f%% of the best-fixed -> oracle gap", 100 * share["share"])
    for name, ci in summary.get("live", {}).get("ratios", {}).items():
        log.info("live %s: %.3f [%.3f, %.3f]", name, ci["ratio"], ci["low"], ci["high"])
    promotion = summary["promotion"]
    log.info("promotion: %s", promotion["reason"])
    if promotion["promoted"]:
        from speckv.serving_registry import promote_generator
        from speckv.serving_schema import GENERATOR_NAME

        served = promote_generator(promotion["version"], "champion", uri=config.tracking_uri)
        log.info(
            "%s@champion: %s",
            GENERATOR_NAME,
            f"v{served}" if served else f"unchanged (no version serves predictor v{promotion['version']})",
        )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    summary = "replay and live-time every gamma policy; promote the MLP if it pays"
    parser = stage_parser(subparsers, "evaluate", summary, "section `evaluate:`", run)
    parser.add_argument("--no-live", action="store_true", help="replay only: skip the wall-clock runs")
