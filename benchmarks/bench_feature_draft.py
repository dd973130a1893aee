"""Does the feature (EAGLE-style) draft pay where the standalone distilled draft does not? Side by side in one
run, on the default target: each draft's cost model calibrated here, dense greedy traces of the same test
prompts, exact replay of none, fixed:1..gamma_max and the hindsight oracle, in modelled tokens per second.

    speckv models distill-features            # builds models/draft-features from the distill stage's cache
    python benchmarks/bench_feature_draft.py  # --per-task 5 --max-new-tokens 48 --compressions fp32

Descriptive: the best fixed gamma is read off the traces it is scored on (the pipeline's evaluate stage is
the honest comparison). Both drafts are replayed with one calibration of the target (verify ms, loop
overhead) and their own draft ms per token, measured in the same run. Prints per draft and compression: draft ms/token and its ratio to the target's
1-token forward, first-token acceptance, every policy's ratio to the target alone, and the paired ratio
(bootstrap over prompts) of the feature draft's best fixed policy to the standalone draft's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from speckv.data.models import DRAFT_DIRNAME, models_dir
from speckv.data.prompts import load_prompt_file
from speckv.predictor.stats import paired_ratio
from speckv.profiling.calibrate import calibrate, draft_ms_per_token
from speckv.profiling.controllers import parse_controller
from speckv.profiling.models import eos_ids, load_pair
from speckv.profiling.replay import oracle, replay, traces_from_frame
from speckv.profiling.traces import batched_traces


def measure(
    target: str, draft: str, compression: str, context, prompts, args, shared
) -> tuple[pd.DataFrame, dict]:
    """Traces and replay of one draft; the target's verify costs and loop overhead come from the first draft's
    calibration (`shared`, filled on the first call) so the two drafts differ only in their measured draft ms."""
    pair = load_pair(target, draft, compression, None, True)
    if compression not in shared:
        shared[compression] = calibrate(pair.target, pair.draft, compression, [context], args.gamma_max)[0]
    base = shared[compression]
    # the step table holds k drafted tokens of the first draft: swap in this draft's measured per-token cost
    draft_ms = draft_ms_per_token(pair.draft, context, 15, 3)
    step_ms = [t + k * (draft_ms - base.draft_ms) for k, t in enumerate(base.step_ms)]
    model = dataclasses.replace(base, draft_ms=draft_ms, step_ms=step_ms)
    costs = model.step_costs(args.gamma_max)
    runs = [
        {"prompt_id": p["prompt_id"], "task": p["task"], "split": "test", "compression": compression}
        for p in prompts
    ]
    tables = batched_traces(
        pair.target,
        pair.draft,
        [p["input_ids"] for p in prompts],
        args.gamma_max,
        args.max_new_tokens,
        eos_ids(pair.tokenizer, pair.target),
        runs,
    )
    traces = traces_from_frame(pd.concat([t.to_pandas() for t in tables], ignore_index=True))
    specs = ["none"] + [f"fixed:{k}" for k in range(1, args.gamma_max + 1)]
    rows = []
    for t in traces:
        for spec in specs:
            r = replay(parse_controller(spec, args.gamma_max, compression), t, costs)
            rows.append({"prompt_id": t.prompt_id, "policy": spec, "tokens": r.new_tokens, "ms": r.model_ms})
        r = oracle(t, costs)
        rows.append({"prompt_id": t.prompt_id, "policy": "oracle", "tokens": r.new_tokens, "ms": r.model_ms})
    first = float(np.mean([m > 0 for t in traces for m in t.match_len]))
    info = {
        "draft_ms": model.draft_ms,
        "target_1tok_ms": model.step_ms[0],
        "cost_ratio": model.draft_ms / model.step_ms[0],
        "first_token_acceptance": first,
    }
    return pd.DataFrame(rows), info


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--target", default="default")
    parser.add_argument("--standalone", default=None, help="standalone draft (default: the distilled one)")
    parser.add_argument("--features", default=None, help="feature draft dir (default: models/draft-features)")
    parser.add_argument("--prompts", default="artifacts/prompts/prompts.jsonl")
    parser.add_argument("--per-task", type=int, default=5, help="test prompts per task")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--gamma-max", type=int, default=8)
    parser.add_argument("--compressions", nargs="+", default=["fp32"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = models_dir()
    drafts = {
        "standalone": args.standalone or str(root / DRAFT_DIRNAME),
        "feature": args.features or str(root / "draft-features"),
    }
    context = load_prompt_file(Path(args.prompts), splits=["dev"], per_task=1)[0]["input_ids"]
    prompts = load_prompt_file(Path(args.prompts), splits=["test"], per_task=args.per_task)
    results, shared = {}, {}
    for compression in args.compressions:
        frames = {}
        for name, ref in drafts.items():
            frame, info = measure(args.target, ref, compression, context, prompts, args, shared)
            pooled = frame.groupby("policy")[["tokens", "ms"]].sum()
            rate = 1000 * pooled["tokens"] / pooled["ms"]
            ratios = (rate / rate["none"]).round(3).to_dict()
            best = max((p for p in ratios if p.startswith(("none", "fixed"))), key=ratios.get)
            frames[name] = (frame, best)
            results[f"{compression}/{name}"] = {**info, "best_fixed": best, "ratio_to_none": ratios}
            print(
                f"{compression} {name}: draft {info['draft_ms']:.2f} ms/token = {info['cost_ratio']:.3f} of the "
                f"target's 1-token forward; first-token acceptance {info['first_token_acceptance']:.3f}; "
                f"best fixed {best} {ratios[best]:.3f}x none, oracle {ratios['oracle']:.3f}x",
                flush=True,
            )
            print("   ", {p: ratios[p] for p in sorted(ratios)}, flush=True)

        both = pd.concat(
            [
                frames[name][0][frames[name][0].policy == frames[name][1]].assign(policy=name)
                for name in ("feature", "standalone")
            ]
        ).rename(columns={"tokens": "new_tokens"})
        ci = paired_ratio(both, "feature", "standalone", time_col="ms", units=("prompt_id",))
        results[f"{compression}/feature_vs_standalone"] = ci.as_dict()
        print(f"{compression}: feature draft's best fixed / standalone draft's best fixed = {ci}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
