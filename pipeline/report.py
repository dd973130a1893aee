"""`speckv report`: the evaluation as Markdown, a self-contained HTML page and DVC metrics."""

from __future__ import annotations

import argparse
import logging

from pipeline.config import load_section
from predictor.report import ReportConfig, build_report

log = logging.getLogger(__name__)


def run(args: argparse.Namespace) -> int:
    config = load_section(ReportConfig, "report", args.params)
    metrics = build_report(config)
    log.info("report written to %s; metrics %s", config.out_dir, metrics)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "report", help="write the evaluation report (Markdown, HTML, metrics.json)"
    )
    parser.add_argument("--params", default="params.yaml", help="params file (section `report:`)")
    parser.set_defaults(func=run)
