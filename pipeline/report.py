"""`speckv report`: the evaluation as an HTML page and Markdown, DVC metrics and plot data, and provenance."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from speckv.data.prompts import PromptsConfig
from speckv.pipeline.config import load_section, stage_parser
from speckv.predictor.evaluation.provenance import collect
from speckv.predictor.evaluation.report import ReportConfig, build_report

log = logging.getLogger(__name__)


def run(args: argparse.Namespace) -> int:
    config = load_section(ReportConfig, "report", args.params, args.pair)
    # The checkout holding the params file: the commit, dirty files and params hash the report records.
    provenance = collect(Path(args.params).resolve().parent, args.params)
    provenance["chat_template"] = load_section(PromptsConfig, "prompts", args.params, args.pair).chat
    metrics = build_report(config, provenance)
    log.info("report written to %s; metrics %s", config.out_dir, metrics)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    summary = "write the evaluation report (HTML, Markdown, metrics.json, provenance.json)"
    stage_parser(subparsers, "report", summary, "section `report:`", run)
