"""Where a decode step's time goes: the loop's own timings against forwards timed in isolation.

For each gamma, runs the real decode loop (`speculative_generate`, fixed gamma) on dev prompts and splits each
decode step into its draft forwards, the target's verify forward and the rest (commit, cache crops,
controller), then times the same forwards in isolation the way a forward-by-forward calibration would (a
repeated forward on a warm cache at the same context length). Prints, per gamma, the loop's step against
the isolated sum (gamma draft tokens + a verify of gamma + 1), the part each piece contributes to the
difference, the share of the first token (both prefills) in a run's wall time, and the process's peak
resident memory.

    python benchmarks/bench_loop_vs_isolated.py --target qwen-coder --draft qwen-coder \\
        --draft-compression same --prompts artifacts/qwen-coder/prompts/prompts.jsonl --gammas 0 2 4
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
from pathlib import Path

import torch
from speckv.data.prompts import load_prompt_file
from speckv.profiling.calibrate import calibration_prompts, draft_ms_per_token, verify_ms_interleaved
from speckv.profiling.controllers import FixedGamma
from speckv.profiling.cpu import cpu_info
from speckv.profiling.decode import DecodeConfig, speculative_generate
from speckv.profiling.models import draft_compression_for, load_pair


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--target", default="default")
    parser.add_argument("--draft", default="default")
    parser.add_argument("--compression", default="fp32")
    parser.add_argument("--draft-compression", default=None, help="null: the draft's own dtype; same; or one")
    parser.add_argument("--prompts", default="artifacts/prompts/prompts.jsonl")
    parser.add_argument("--n-prompts", type=int, default=2, help="dev prompts spread over the lengths")
    parser.add_argument("--gammas", type=int, nargs="+", default=[0, 2, 4])
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.n_prompts < 1 or args.max_new_tokens < 2 or min(args.gammas) < 0 or args.repeats < 1:
        parser.error("--n-prompts, --repeats >= 1, --max-new-tokens >= 2 and gammas >= 0 required")
    if not Path(args.prompts).is_file():
        parser.error(f"prompt file not found: {args.prompts}")
    torch.set_num_threads(args.threads)
    draft_compression = draft_compression_for(args.draft_compression, args.compression)
    pair = load_pair(args.target, args.draft, args.compression, None, True, draft_compression)
    rows = load_prompt_file(Path(args.prompts), splits=["dev"])
    prompts = calibration_prompts([r["input_ids"] for r in rows], args.n_prompts)
    gamma_max = max(args.gammas)
    config = DecodeConfig(max_new_tokens=args.max_new_tokens, gamma_max=max(gamma_max, 1))
    warm = DecodeConfig(max_new_tokens=4, gamma_max=max(gamma_max, 1))
    speculative_generate(pair.target, pair.draft, prompts[0], FixedGamma(gamma_max), warm, args.compression)

    info = cpu_info()
    print(f"{args.target} / {args.draft}, {args.compression} (draft {draft_compression or 'own dtype'})")
    print(f"CPU: {info.get('model')} ({info.get('capability')}), {args.threads} threads")
    print(
        "| prompt tokens | gamma | loop step ms | isolated ms | loop / isolated | draft: loop - isolated | "
        "verify: loop - isolated | rest of the step | first token share of wall |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for prompt in prompts:
        draft_iso = draft_ms_per_token(pair.draft, prompt, args.repeats, 2) if gamma_max else 0.0
        sizes = sorted({g + 1 for g in args.gammas})
        verify_iso = dict(
            zip(sizes, verify_ms_interleaved(pair.target, prompt, sizes, args.repeats, 2), strict=True)
        )
        for gamma in args.gammas:
            result = speculative_generate(
                pair.target, pair.draft, prompt, FixedGamma(gamma), config, args.compression
            )
            decode = [i for i in range(1, result.steps) if result.gammas[i] == gamma]
            if not decode:
                continue
            step = statistics.median(result.step_s[i] * 1e3 for i in decode)
            draft = statistics.median(result.draft_s[i] * 1e3 for i in decode)
            verify = statistics.median(result.verify_s[i] * 1e3 for i in decode)
            isolated = gamma * draft_iso + verify_iso[gamma + 1]
            print(
                f"| {len(prompt)} | {gamma} | {step:.1f} | {isolated:.1f} | {step / isolated:.3f} | "
                f"{draft - gamma * draft_iso:+.1f} | {verify - verify_iso[gamma + 1]:+.1f} | "
                f"{step - draft - verify:.1f} | {result.ttft_s / result.wall_s:.1%} |"
            )
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    print(f"peak resident memory of this process: {peak_gb:.1f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
