"""Traced positions per minute of the profile stage's jobs: the local executor with N torch threads against
Ray with N single-threaded workers (a local Ray instance), on the same prompts of the real pair, side by
side in one run, each into a fresh output directory:

    python benchmarks/bench_ray_profile.py --per-task 8 --trace-batch 8 --workers 2

Ray's time includes starting the instance and each worker loading the pair once; 2-thread torch on 2 shared
cores has been erratic here, which is what single-threaded workers avoid.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from common import add_pair_arguments
from speckv.data.prompts import load_prompt_file
from speckv.profiling.decode import DecodeConfig
from speckv.profiling.models import eos_ids, load_pair
from speckv.profiling.profile import run_profile
from speckv.profiling.ray_executor import PairSpec, RayExecutor


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_pair_arguments(parser, split="dev", per_task=8)
    parser.add_argument("--compression", default="fp32")
    parser.add_argument("--trace-batch", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2, help="Ray workers (1 thread each) = local threads")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    prompts = load_prompt_file(args.prompts, splits=[args.split], per_task=args.per_task)
    torch.set_num_threads(args.workers)
    pair = load_pair(args.target, args.draft, args.compression)
    decode = DecodeConfig(max_new_tokens=args.max_new_tokens, gamma_max=8)
    decode = replace(decode, eos_token_ids=eos_ids(pair.tokenizer, pair.target))
    meta = {"target": args.target, "draft": args.draft, "compression": args.compression}
    spec = PairSpec(args.target, args.draft, args.compression, None, True, 1)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("local", "ray"):
            start = time.perf_counter()
            executor = RayExecutor(spec, num_cpus=args.workers) if name == "ray" else None
            counts = run_profile(
                pair, [], [], decode, Path(tmp) / name, prompts, meta, False, args.trace_batch, executor
            )
            results[name] = (counts["traces"], time.perf_counter() - start)
    print(f"{len(prompts)} {args.split} prompts, {args.compression}, trace batch {args.trace_batch}")
    for name, (positions, seconds) in results.items():
        print(f"{name}: {positions} positions in {seconds:.1f} s = {60 * positions / seconds:.0f} per minute")
    (local_n, local_s), (ray_n, ray_s) = results["local"], results["ray"]
    print(f"ray / local traced positions per minute: {(ray_n / ray_s) / (local_n / local_s):.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
