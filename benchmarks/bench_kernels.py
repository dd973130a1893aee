"""Few-row CPU kernels (profiling/kernels.py) on versus off, side by side in one run.

For each compression: the target's forward time over 1..gamma_max+1 new tokens after a cached prompt (what
the cost model calibrates), then wall-clock tokens/s of `none` and `fixed:1` / `fixed:2` decoding, with the
kernels installed and removed on the same loaded models, interleaved, medians of `--repeats` rounds.
Also prints the largest logit difference the kernels cause and whether greedy outputs stayed identical.

    python benchmarks/bench_kernels.py [--compressions fp32 nf4] [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import logging
import statistics

import torch
from speckv.data.prompts import load_prompt_file
from speckv.profiling import kernels
from speckv.profiling.calibrate import forward_ms
from speckv.profiling.controllers import parse_controller
from speckv.profiling.decode import DecodeConfig, speculative_generate
from speckv.profiling.models import eos_ids, load_pair


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="default")
    parser.add_argument("--draft", default="default")
    parser.add_argument(
        "--prompts", default="artifacts/prompts/prompts.jsonl", help="first dev prompt is used"
    )
    parser.add_argument("--compressions", nargs="+", default=["fp32"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    torch.set_num_threads(args.threads)
    prompt = load_prompt_file(args.prompts, splits=["dev"], per_task=1)[0]["input_ids"]
    print(
        f"{args.target} / {args.draft}, {len(prompt)}-token prompt, {args.threads} threads, medians of {args.repeats}"
    )
    for compression in args.compressions:
        pair = load_pair(args.target, args.draft, compression, "cpu", cpu_kernels=False)
        models = [m for m in (pair.target, pair.draft) if m is not None]
        config = DecodeConfig(
            max_new_tokens=args.max_new_tokens, eos_token_ids=eos_ids(pair.tokenizer, pair.target)
        )

        def switch(on: bool, models: list = models) -> None:
            for m in models:
                (kernels.install if on else kernels.uninstall)(m)

        diff = 0.0
        with torch.inference_mode():  # inputs of 1..12 rows: each kernel path is compared with F.linear
            for n in (1, 2, 5, 12):
                ids = torch.tensor([prompt[:n]])
                switch(False)
                ref = pair.target(ids).logits
                switch(True)
                diff = max(diff, (pair.target(ids).logits - ref).abs().max().item())
        n_tokens = list(range(1, 10))
        controllers = ["none", "fixed:1", "fixed:2"]
        fwd: dict = {}
        tps: dict = {}
        outputs: dict = {}
        for _ in range(args.repeats):
            for on in (False, True):
                switch(on)
                for n in n_tokens:
                    fwd.setdefault((on, n), []).append(
                        forward_ms(pair.target, prompt, n, repeats=3, warmup=1)
                    )
                for name in controllers:
                    r = speculative_generate(
                        pair.target, pair.draft, prompt, parse_controller(name, 8), config, compression
                    )
                    tps.setdefault((on, name), []).append(r.new_tokens / r.wall_s)
                    outputs.setdefault((on, name), r.token_ids)
        switch(False)
        lossless = len({tuple(v) for v in outputs.values()}) == 1
        print(
            f"\n[{compression}] max |logit difference| (1-12 token inputs): {diff:.2e}; greedy outputs identical: {lossless}"
        )
        print("  target forward ms   " + " ".join(f"{n:>6d}" for n in n_tokens))
        for on in (False, True):
            med = [statistics.median(fwd[(on, n)]) for n in n_tokens]
            print(f"  kernels {'on ' if on else 'off'}         " + " ".join(f"{v:6.1f}" for v in med))
        ratio = [statistics.median(fwd[(False, n)]) / statistics.median(fwd[(True, n)]) for n in n_tokens]
        print("  speedup off/on      " + " ".join(f"{v:6.2f}" for v in ratio))
        for on in (False, True):
            base = statistics.median(tps[(on, "none")])
            row = ", ".join(
                f"{name} {statistics.median(tps[(on, name)]):.1f} tok/s ({statistics.median(tps[(on, name)]) / base:.2f}x none)"
                for name in controllers
            )
            print(f"  kernels {'on ' if on else 'off'}: {row}")
        print(
            "  none on/off: "
            f"{statistics.median(tps[(True, 'none')]) / statistics.median(tps[(False, 'none')]):.2f}x, "
            f"fixed:1 on / none off: {statistics.median(tps[(True, 'fixed:1')]) / statistics.median(tps[(False, 'none')]):.2f}x"
        )
        del pair


if __name__ == "__main__":
    main()
