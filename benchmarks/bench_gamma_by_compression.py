"""Which fixed gamma a pair wants at each compression: exact replay of dense greedy traces under this
machine's calibrated cost models (none, fixed:1..gamma_max, the hindsight oracle), per compression and task,
plus acceptance by draft position.

    speckv models fetch qwen-coder
    python benchmarks/bench_gamma_by_compression.py --pair qwen-coder

Reads the pair's pipeline outputs (params.yaml's `pairs:` entry), running `speckv prompts`, `speckv calibrate`
and `speckv profile --pair NAME` when they are missing (`--rerun` forces them), then replays its traces. `--draft-compression int8|nf4|same` compresses the draft too
(the pipeline compresses the target only): the benchmark then loads each pair itself, calibrates and traces
the params' test prompts with the library functions the stages call, and keeps nothing on disk. A quantized
draft's teacher-forced batched passes may differ in the last bits from its one-token decoding: acceptance
stays exact for the tokens traced, the draft's own tokens could differ rarely from a live run's. Descriptive: the best gamma is read off the same traces it is
scored on (no dev/test split) — the pipeline's evaluate stage is the honest comparison; this answers "where
does the pair sit" in minutes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from speckv.pipeline.config import load_params, pair_section
from speckv.predictor.stats import paired_ratio
from speckv.profiling.controllers import parse_controller
from speckv.profiling.costmodel import CostModel
from speckv.profiling.replay import load_traces, oracle, replay


def pair_params(params: Path, pair: str) -> dict:
    """The prompts, calibrate and profile sections as pair `pair` runs them."""
    raw = load_params(params)
    return {section: pair_section(raw, section, pair) for section in ("prompts", "calibrate", "profile")}


def run_stages(params: Path, pair: str, config: dict, rerun: bool) -> None:
    speckv = str(Path(sys.executable).with_name("speckv"))
    outputs = {
        "prompts": Path(config["prompts"]["out"]),
        "calibrate": Path(config["calibrate"]["out_dir"]) / f"{config['calibrate']['compressions'][-1]}.json",
        "profile": Path(config["profile"]["out_dir"]) / "traces",
    }
    for stage, out in outputs.items():
        if rerun or not out.exists():
            print(f"running speckv {stage} --params {params} --pair {pair}", flush=True)
            subprocess.run([speckv, stage, "--params", str(params), "--pair", pair], check=True)


def measure_with_compressed_draft(config: dict, draft_compression: str) -> tuple[list, dict]:
    """Traces and cost models of the params' pair with the draft loaded at `draft_compression` (`same`: the
    target's), per target compression, measured in this process."""
    import torch
    from speckv.data.prompts import load_prompt_file
    from speckv.profiling.calibrate import calibrate, calibration_prompts
    from speckv.profiling.models import eos_ids, load_pair
    from speckv.profiling.replay import traces_from_frame
    from speckv.profiling.traces import batched_traces

    cal, prof = config["calibrate"], config["profile"]
    torch.set_num_threads(int(prof["threads"]))
    dev = load_prompt_file(Path(cal["prompts"]), splits=["dev"])
    contexts = calibration_prompts([p["input_ids"] for p in dev], int(cal.get("loop_prompts", 3)))
    tests = load_prompt_file(
        Path(prof["prompts"]), splits=["test"], per_task=int(prof["trace_per_task"]["test"])
    )
    frames, costs = [], {}
    for compression in prof["compressions"]:
        pair = load_pair(
            prof["target"],
            prof["draft"],
            compression,
            prof["device"],
            prof["cpu_kernels"],
            draft_compression=compression if draft_compression == "same" else draft_compression,
        )
        target, draft = pair.target, pair.draft
        print(f"{compression} target, {draft_compression} draft: calibrating and tracing", flush=True)
        model, _ = calibrate(
            target,
            draft,
            compression,
            contexts,
            int(prof["gamma_max"]),
            int(cal.get("max_new_tokens", 64)),
            int(cal["repeats"]),
            int(cal["warmup"]),
        )
        costs[compression] = model.step_costs(int(prof["gamma_max"]))
        runs = [
            {"prompt_id": p["prompt_id"], "task": p["task"], "split": "test", "compression": compression}
            for p in tests
        ]
        tables = batched_traces(
            target,
            draft,
            [p["input_ids"] for p in tests],
            int(prof["gamma_max"]),
            int(prof["max_new_tokens"]),
            eos_ids(pair.tokenizer, target),
            runs,
            batch_size=int(prof["trace_batch"]),
        )
        frames += [t.to_pandas() for t in tables]
        del pair, target, draft
    return traces_from_frame(pd.concat(frames, ignore_index=True)), costs


def sweep(traces, costs, gamma_max: int) -> dict:
    specs = ["none"] + [f"fixed:{k}" for k in range(1, gamma_max + 1)]
    out = {}
    for c in sorted(costs):
        ts = [t for t in traces if t.compression == c]
        rows = [
            {
                "compression": c,
                "prompt_id": t.prompt_id,
                "task": t.task,
                "policy": s,
                "new_tokens": r.new_tokens,
                "model_ms": r.model_ms,
            }
            for s in specs
            for t in ts
            for r in [replay(parse_controller(s, gamma_max, c), t, costs[c])]
        ]
        rows += [
            {
                "compression": c,
                "prompt_id": t.prompt_id,
                "task": t.task,
                "policy": "oracle",
                "new_tokens": r.new_tokens,
                "model_ms": r.model_ms,
            }
            for t in ts
            for r in [oracle(t, costs[c])]
        ]
        frame = pd.DataFrame(rows)
        pooled = frame.groupby("policy")[["new_tokens", "model_ms"]].sum()
        rate = (1000 * pooled["new_tokens"] / pooled["model_ms"]).to_dict()
        best = max(specs, key=rate.get)
        by_task = {}
        for task, g in frame.groupby("task"):
            p = g.groupby("policy")[["new_tokens", "model_ms"]].sum()
            r = (p["new_tokens"] / p["model_ms"]).drop("oracle")
            by_task[task] = {"best": r.idxmax(), "best_vs_none": float(r.max() / r["none"])}
        match = np.concatenate([t.match_len for t in ts])
        out[c] = {
            "traces": len(ts),
            "positions": int(len(match)),
            "target_ms": costs[c][0],
            "draft_ms": costs[c].draft_ms,
            "tokens_per_s": {k: round(v, 3) for k, v in rate.items()},
            "best_fixed": best,
            "best_vs_none": paired_ratio(frame, best, "none", time_col="model_ms").as_dict(),
            "fixed4_vs_none": paired_ratio(frame, "fixed:4", "none", time_col="model_ms").as_dict(),
            "oracle_vs_best": paired_ratio(frame, "oracle", best, time_col="model_ms").as_dict(),
            "accepted_at_least": [round(float((match >= j).mean()), 3) for j in range(1, gamma_max + 1)],
            "best_by_task": by_task,
        }
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--pair", default="qwen-coder", help="an entry of the params file's `pairs:`")
    parser.add_argument(
        "--rerun", action="store_true", help="rerun prompts/calibrate/profile even if present"
    )
    parser.add_argument("--json", type=Path, help="also write the result here")
    parser.add_argument(
        "--draft-compression",
        choices=["int8", "nf4", "same"],
        help="compress the draft too (default: its own dtype, as the pipeline runs it)",
    )
    args = parser.parse_args()
    config = pair_params(args.params, args.pair)
    gamma_max = int(config["profile"]["gamma_max"])
    if args.draft_compression:
        traces, costs = measure_with_compressed_draft(config, args.draft_compression)
    else:
        run_stages(args.params, args.pair, config, args.rerun)
        traces = load_traces(Path(config["profile"]["out_dir"]) / "traces")
        cal = Path(config["calibrate"]["out_dir"])
        costs = {
            c: CostModel.load(cal / f"{c}.json").step_costs(gamma_max)
            for c in sorted({t.compression for t in traces})
        }
    result = sweep(traces, costs, gamma_max)
    for c, v in result.items():
        ci = v["best_vs_none"]
        print(
            f"{c}: target-alone step {v['target_ms']:.0f} ms, draft {v['draft_ms']:.0f} ms/token; best fixed "
            f"{v['best_fixed']} = {ci['ratio']:.3f}x none [{ci['low']:.3f}, {ci['high']:.3f}]; fixed:4 "
            f"{v['fixed4_vs_none']['ratio']:.3f}x none; oracle {v['oracle_vs_best']['ratio']:.3f}x best "
            f"({v['traces']} traces, {v['positions']} positions)"
        )
        print(f"    accepted at least j drafted tokens, j=1..{gamma_max}: {v['accepted_at_least']}")
        print(
            "    best by task: "
            + ", ".join(
                f"{t}: {b['best']} ({b['best_vs_none']:.2f}x none)" for t, b in v["best_by_task"].items()
            )
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
