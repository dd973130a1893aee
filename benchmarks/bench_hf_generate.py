"""transformers generate() with `custom_generate=speckv.assisted(...)` against the decode loop called directly:
the same controller on the same prompts, interleaved per prompt (the order alternating), so machine noise hits
both alike; beside the totals, the median ratio of back-to-back pairs resists load drift. Every output is
checked against target-only greedy generate(); the ratio shows what generate()'s own preparation adds.

    python benchmarks/bench_hf_generate.py --tiny [--prompts 8] [--controller fixed:4]
    python benchmarks/bench_hf_generate.py --target default --draft default --compression fp32 \\
        --controller threshold:0.5 --prompts 8 --prompt-file artifacts/prompts/prompts.jsonl
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import build_pair  # noqa: E402
from speckv.profiling.controllers import parse_controller  # noqa: E402
from speckv.profiling.decode import DecodeConfig, speculative_generate  # noqa: E402

from speckv.hf import assisted  # noqa: E402


def load(args) -> tuple[object, object, list[list[int]], tuple[int, ...]]:
    """(target, draft, prompts as token ids, EOS ids)."""
    if args.tiny:
        if args.compression != "fp32":
            raise SystemExit(
                "--tiny builds an fp32 pair in memory; use --target/--draft for other compressions"
            )
        target, draft = build_pair()
        gen = torch.Generator().manual_seed(0)
        prompts = [torch.randint(3, 4096, (64,), generator=gen).tolist() for _ in range(args.prompts)]
        return target, draft, prompts, (2,)
    from speckv.data.prompts import load_prompt_file
    from speckv.profiling.models import eos_ids, load_pair

    pair = load_pair(args.target, args.draft, args.compression)
    rows = load_prompt_file(args.prompt_file, splits=["test"])
    step = max(1, len(rows) // args.prompts)  # spread over the tasks (rows are sorted by task)
    prompts = [r["input_ids"] for r in rows[::step][: args.prompts]]
    return pair.target, pair.draft, prompts, eos_ids(pair.tokenizer, pair.target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the in-memory tiny pair of bench_decode.py")
    parser.add_argument("--target", default="default")
    parser.add_argument("--draft", default="default")
    parser.add_argument("--compression", default="fp32")
    parser.add_argument("--controller", default="fixed:4")
    parser.add_argument("--gamma-max", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=8, help="number of test prompts")
    parser.add_argument("--prompt-file", default="artifacts/prompts/prompts.jsonl")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each variant per prompt")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    target, draft, prompts, eos = load(args)
    pad = eos[0] if eos else 0
    method = assisted(draft, args.controller, gamma_max=args.gamma_max)
    controller = parse_controller(args.controller, args.gamma_max, args.compression)
    config = DecodeConfig(max_new_tokens=args.max_new_tokens, gamma_max=args.gamma_max, eos_token_ids=eos)

    def hf_assisted(ids: list[int]) -> tuple[list[int], float]:
        t0 = time.perf_counter()
        out = target.generate(
            torch.tensor([ids], device=target.device),
            max_new_tokens=args.max_new_tokens,
            eos_token_id=list(eos),
            pad_token_id=pad,
            custom_generate=method,
        )
        return out[0, len(ids) :].tolist(), time.perf_counter() - t0

    def direct(ids: list[int]) -> tuple[list[int], float]:
        t0 = time.perf_counter()
        result = speculative_generate(target, draft, ids, controller, config, args.compression)
        return result.token_ids, time.perf_counter() - t0

    variants = {"generate(custom_generate=assisted)": hf_assisted, "speculative_generate": direct}
    tokens = dict.fromkeys(variants, 0)
    seconds = dict.fromkeys(variants, 0.0)
    for fn in variants.values():  # warm-up
        fn(prompts[0])
    mismatches = 0
    accepted = drafted = 0
    paired: list[float] = []  # tokens/s ratio of the two variants run back to back: robust to load drift
    for i, ids in enumerate(prompts):
        expected = target.generate(
            torch.tensor([ids], device=target.device),
            do_sample=False,
            max_new_tokens=args.max_new_tokens,
            eos_token_id=list(eos),
            pad_token_id=pad,
        )[0, len(ids) :].tolist()
        order = list(variants) if i % 2 == 0 else list(reversed(variants))
        for _ in range(args.repeats):
            walls = {}
            for name in order:
                out, walls[name] = variants[name](ids)
                mismatches += out != expected
                tokens[name] += len(out)
                seconds[name] += walls[name]
            paired.append(walls["speculative_generate"] / walls["generate(custom_generate=assisted)"])
        accepted += method.last_result.accepted
        drafted += method.last_result.drafted
    rate = {name: tokens[name] / seconds[name] for name in variants}
    pair = "tiny pair: target 8x512, draft 1x512" if args.tiny else f"{args.target} / {args.draft}"
    print(
        f"{pair}, {args.compression}, controller {args.controller} (acceptance {accepted / max(drafted, 1):.2f}); "
        f"{len(prompts)} prompts x {args.repeats} interleaved runs, up to {args.max_new_tokens} new tokens, "
        f"{torch.get_num_threads()} threads"
    )
    for name in variants:
        print(f"  {name:36s} {rate[name]:8.1f} tok/s  ({tokens[name]} tokens)")
    ratio = rate["generate(custom_generate=assisted)"] / rate["speculative_generate"]
    print(f"  ratio generate / speculative_generate  {ratio:.3f}  (total tokens / total seconds)")
    print(
        f"  median paired ratio                    {statistics.median(paired):.3f}  (per back-to-back pair)"
    )
    runs = len(prompts) * args.repeats * len(variants)
    print(f"  outputs equal to target-only greedy generate(): {runs - mismatches} of {runs}")
    if mismatches:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
