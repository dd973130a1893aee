"""Traced tokens per minute: the batched, teacher-forced traces (what `speckv profile` runs) against the
incremental reference (one target decode per prompt, gamma_max sequential draft forwards per position), on the
same prompts of the real pair, side by side in one run. Also reports how often the two disagree:

    python benchmarks/bench_traces.py --per-task 2 --compressions fp32 int8 nf4

Disagreement is counted per position: a different target token (continuation), match length or drafted
tokens, and the largest difference in any draft signal. Float rounding differs between batched and one-row
kernels, so rare flips at exact near-ties are possible; the decode loop itself is never changed by this.
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np
import torch
from common import add_pair_arguments
from speckv.data.prompts import load_prompt_file
from speckv.profiling.models import eos_ids, load_pair
from speckv.profiling.trace_reference import dense_trace
from speckv.profiling.traces import batched_traces


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_pair_arguments(parser, split="dev", per_task=2)
    parser.add_argument("--compressions", nargs="+", default=["fp32"])
    parser.add_argument("--gamma-max", type=int, default=8)
    parser.add_argument("--batch", type=int, default=48, help="continuations decoded together (batched path)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    prompts = load_prompt_file(args.prompts, splits=[args.split], per_task=args.per_task)
    print(
        f"{len(prompts)} {args.split} prompts, gamma_max {args.gamma_max}, {args.max_new_tokens} new tokens"
    )
    for compression in args.compressions:
        pair = load_pair(args.target, args.draft, compression)
        eos = eos_ids(pair.tokenizer, pair.target)
        runs = [
            {"prompt_id": p["prompt_id"], "task": p["task"], "split": p["split"], "compression": compression}
            for p in prompts
        ]
        ids = [p["input_ids"] for p in prompts]
        start = time.perf_counter()
        fast = batched_traces(
            pair.target, pair.draft, ids, args.gamma_max, args.max_new_tokens, eos, runs, args.batch
        )
        fast_s = time.perf_counter() - start
        start = time.perf_counter()
        slow = [
            dense_trace(pair.target, pair.draft, x, args.gamma_max, args.max_new_tokens, eos, run)
            for x, run in zip(ids, runs, strict=True)
        ]
        slow_s = time.perf_counter() - start
        positions = sum(t.num_rows for t in slow)
        same_cont = diff_match = diff_tokens = compared = 0
        worst = 0.0
        for a, b in zip(fast, slow, strict=True):
            a, b = a.to_pydict(), b.to_pydict()
            same_cont += a["target_token"] == b["target_token"]
            for i in range(min(len(a["new_index"]), len(b["new_index"]))):
                if a["target_token"][: i + 1] != b["target_token"][: i + 1]:
                    break  # past a continuation mismatch the positions are not comparable
                compared += 1
                diff_match += a["match_len"][i] != b["match_len"][i]
                diff_tokens += a["draft_tokens"][i] != b["draft_tokens"][i]
                if a["draft_tokens"][i] == b["draft_tokens"][i]:
                    worst = max(
                        worst, float(np.abs(np.subtract(a["draft_prob"][i], b["draft_prob"][i])).max())
                    )
        print(
            f"{compression}: batched {fast_s:.1f} s, incremental {slow_s:.1f} s for {positions} traced positions "
            f"({positions * 60 / fast_s:.0f} vs {positions * 60 / slow_s:.0f} per minute): "
            f"{slow_s / fast_s:.2f}x | continuations equal {same_cont}/{len(prompts)}; of {compared} comparable "
            f"positions, match_len differs at {diff_match}, draft tokens at {diff_tokens}; "
            f"largest draft_prob difference {worst:.1e}"
        )
        del pair
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
