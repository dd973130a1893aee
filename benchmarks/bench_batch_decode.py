"""Batched speculative decoding benchmark: decode tokens/s summed over the batch at several batch sizes, for the
target alone (`none`) and a fixed gamma, side by side from one run; and batch 1 of the batched function
against `speculative_generate` (the same tokens; their speeds). Runs are interleaved and repeated, medians
printed, so machine noise hits every variant alike.

    python benchmarks/bench_batch_decode.py [--batches 1 2 4 8] [--gamma 4] [--repeats 5]
    python benchmarks/bench_batch_decode.py --target default --draft default --prompts artifacts/prompts/prompts.jsonl
"""

from __future__ import annotations

import argparse
import statistics

import torch
from bench_decode import build_pair
from speckv.profiling.batch_decode import speculative_generate_batch
from speckv.profiling.controllers import parse_controller
from speckv.profiling.decode import DecodeConfig, speculative_generate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--gamma", type=int, default=4, help="the fixed gamma compared with `none`")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--target", help="a real target instead of the tiny pair (with --draft, --prompts)")
    parser.add_argument("--draft")
    parser.add_argument("--prompts", help="prompt file; its first dev prompts are used")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.batches = sorted(set(args.batches) | {1})  # batch 1 is compared with speculative_generate
    most = max(args.batches)
    if args.target:
        from speckv.data.prompts import load_prompt_file
        from speckv.profiling.models import load_pair

        pair = load_pair(args.target, args.draft, "fp32")
        target, draft = pair.target, pair.draft
        rows = load_prompt_file(args.prompts, splits=["dev"])
        prompts = [row["input_ids"] for row in rows[:most]]
        if len(prompts) < most:
            parser.error(f"{args.prompts} holds {len(prompts)} dev prompts; --batches asks for {most}")
        pair_name = f"{args.target} / {args.draft}"
    else:
        target, draft = build_pair()
        # different lengths, so rows are padded and advance apart as in real batches
        prompts = [list(range(10 + 3 * i, 60 + 5 * i)) for i in range(most)]
        pair_name = "tiny pair: target 8x512, draft 1x512"
    config = DecodeConfig(max_new_tokens=args.max_new_tokens)
    specs = ["none", f"fixed:{args.gamma}"]

    def batched(spec: str, batch: int):
        controllers = [parse_controller(spec, 8) for _ in range(batch)]
        return speculative_generate_batch(target, draft, prompts[:batch], controllers, config)

    def alone(spec: str):
        return speculative_generate(target, draft, prompts[0], parse_controller(spec, 8), config)

    variants = {
        (spec, batch): (lambda s=spec, b=batch: batched(s, b)) for spec in specs for batch in args.batches
    }
    variants |= {(spec, "loop"): (lambda s=spec: alone(s)) for spec in specs}
    for run in variants.values():  # warm-up
        run()
    samples: dict = {key: [] for key in variants}
    for _ in range(args.repeats):
        for key, run in variants.items():
            samples[key].append(run().decode_tokens_per_s)
    med = {key: statistics.median(values) for key, values in samples.items()}

    print(
        f"{pair_name}; {args.max_new_tokens} new tokens per row, decode tokens/s summed over the batch, "
        f"median of {args.repeats} interleaved runs, {torch.get_num_threads()} threads"
    )
    print("  " + f"{'controller':16s}" + "".join(f"{f'B={b}':>10s}" for b in args.batches))
    for spec in specs:
        print("  " + f"{spec:16s}" + "".join(f"{med[spec, b]:10.1f}" for b in args.batches))
    fixed = specs[1]
    print(
        "  "
        + f"{fixed + ' / none':16s}"
        + "".join(f"{med[fixed, b] / med['none', b]:10.3f}" for b in args.batches)
    )
    print(
        "  "
        + f"{'none B=b / B=1':16s}"
        + "".join(f"{med['none', b] / med['none', 1]:10.3f}" for b in args.batches)
    )
    stats = batched(fixed, most)
    print(
        f"  {fixed} at B={most}: acceptance {stats.acceptance_rate:.2f}, "
        f"mean draft {1e3 * statistics.mean(stats.draft_s):.1f} ms and verify {1e3 * statistics.mean(stats.verify_s):.1f} ms per step"
    )
    for spec in specs:
        same = batched(spec, 1).rows[0].token_ids == alone(spec).token_ids
        print(
            f"  batch 1, {spec}: speculative_generate {med[spec, 'loop']:.1f} tok/s, batched path "
            f"{med[spec, 1]:.1f} tok/s ({med[spec, 1] / med[spec, 'loop']:.3f}x); same tokens: {same}"
        )


if __name__ == "__main__":
    main()
