"""Wall-clock speedup of controllers over the target alone on held-out (test-split) prompts, real pair.

Every prompt runs every controller (plus `none`) in the real decode loop, in an order that rotates from
prompt to prompt, `--repeats` times over; greedy outputs must match `none`. Prints, per task and overall,
the ratio of pooled tokens/s to `none` with a paired bootstrap 95% CI over prompts, and the acceptance
rate (accepted / drafted tokens, pooled). This is the check behind "`fixed:1` is at least as fast as
`none`" for the default pair:

    python benchmarks/bench_heldout.py --per-task 5 --max-new-tokens 48 --controllers fixed:1
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pandas as pd
import torch
from common import add_pair_arguments
from speckv.data.prompts import load_prompt_file
from speckv.predictor.evaluation.live import run_live
from speckv.predictor.stats import paired_ratio
from speckv.profiling.controllers import parse_controller
from speckv.profiling.decode import DecodeConfig
from speckv.profiling.models import eos_ids, load_pair


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_pair_arguments(parser, split="test", per_task=5)
    parser.add_argument("--compression", default="fp32")
    parser.add_argument("--controllers", nargs="+", default=["fixed:1"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    # run_live logs one line per prompt: the progress of a run that takes minutes.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)

    pair = load_pair(args.target, args.draft, args.compression)
    prompts = load_prompt_file(Path(args.prompts), splits=[args.split], per_task=args.per_task)
    config = DecodeConfig(
        max_new_tokens=args.max_new_tokens, eos_token_ids=eos_ids(pair.tokenizer, pair.target)
    )
    roles = {
        spec: parse_controller(spec, config.gamma_max, args.compression)
        for spec in ["none", *args.controllers]
    }
    frames = []
    for repeat in range(args.repeats):
        # Shift the rotation between repeats so every controller also runs first on every prompt.
        shifted = prompts[repeat:] + prompts[:repeat]
        rows = run_live(pair, shifted, roles, config, warmup_tokens=8 if repeat == 0 else 0)
        frames.append(pd.DataFrame(rows))
    frame = pd.concat(frames)
    lossless = bool(frame["matches_none"].all())
    print(
        f"{args.target} / {args.draft} at {args.compression}: {len(prompts)} {args.split} prompts x "
        f"{args.repeats} repeats, {args.max_new_tokens} new tokens, threads {args.threads}; "
        f"greedy outputs identical to none: {lossless}"
    )
    print("| controller | group | tokens/s ratio to none [95% CI] | acceptance |")
    print("|---|---|---|---|")
    for spec in args.controllers:
        for group in ["all", *sorted(frame["task"].unique())]:
            part = frame if group == "all" else frame[frame["task"] == group]
            ci = paired_ratio(part, spec, "none", time_col="wall_s", units=("prompt_id",))
            runs = part[part["policy"] == spec]
            acc = runs["accepted"].sum() / max(1, runs["drafted"].sum())
            print(f"| {spec} | {group} | {ci} | {acc:.3f} |")
    return 0 if lossless else 1


if __name__ == "__main__":
    raise SystemExit(main())
