"""`speckv`: one console script, one subcommand per pipeline stage."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from speckv.profiling.errors import SpeckvError

# Each module defines `register(subparsers)`, which adds its subcommand and sets `func` on the parser.
STAGE_MODULES = (
    "speckv.pipeline.batch",
    "speckv.pipeline.evaluate",
    "speckv.pipeline.generate",
    "speckv.pipeline.llamacpp",
    "speckv.pipeline.profile",
    "speckv.pipeline.models",
    "speckv.pipeline.pair",
    "speckv.pipeline.prompts",
    "speckv.pipeline.report",
    "speckv.pipeline.train",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="speckv",
        description="Profile speculative decoding, learn when to stop drafting, and measure whether it pays.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in STAGE_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return int(args.func(args) or 0)
    except SpeckvError as exc:
        print(f"speckv {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"speckv {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
