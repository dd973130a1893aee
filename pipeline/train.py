"""`speckv train`: fit the acceptance predictor on the profiled tokens, export it, log and register it."""

from __future__ import annotations

import argparse
import logging
from dataclasses import asdict
from pathlib import Path

from speckv.pipeline.config import load_section, stage_parser
from speckv.predictor.train import TrainConfig, run_training

from speckv.serving_schema import ServeConfig

log = logging.getLogger(__name__)

OUTPUT_FILES = ("metrics.json", "importance.json", "importance.md", "reliability.png", "importance.png")


def run(args: argparse.Namespace) -> int:
    config = load_section(TrainConfig, "train", args.params, args.pair)
    serve = load_section(ServeConfig, "serve", args.params, args.pair)
    metrics = run_training(config)
    for name, scores in metrics["models"].items():
        log.info(
            "test %-22s AUC %.4f  log loss %.4f  Brier %.4f",
            name,
            scores["roc_auc"],
            scores["log_loss"],
            scores["brier"],
        )
    from speckv.predictor.registry import MODEL_NAME, log_training_run  # MLflow is slow to import

    out_dir = Path(config.out_dir)
    run_id, version = log_training_run(
        asdict(config),
        metrics,
        [out_dir / name for name in OUTPUT_FILES],
        Path(config.export_dir),
        uri=config.tracking_uri,
        experiment=config.experiment,
        artifact_location=config.artifact_location,
        register=config.register,
    )
    log.info("MLflow run %s%s", run_id, f"; registered {MODEL_NAME} v{version} @candidate" if version else "")
    if version:
        from speckv.serving_registry import register_generator
        from speckv.serving_schema import GENERATOR_NAME

        # the generator params.yaml's `serve:` describes (a `@candidate` predictor is pinned to the version
        # just registered); nothing loads here
        _, served = register_generator(
            **asdict(serve),
            uri=config.tracking_uri,
            experiment=config.experiment,
            artifact_location=config.artifact_location,
        )
        log.info("registered %s v%s @candidate (controller %s)", GENERATOR_NAME, served, serve.controller)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    summary = "train, export and register the acceptance predictor"
    stage_parser(subparsers, "train", summary, "sections `train:` and `serve:`", run)
