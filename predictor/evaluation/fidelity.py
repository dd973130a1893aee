"""Does replay predict live decoding? Every live run of our loop, replayed on the same prompt's trace.

For each compression and live policy the same concrete controller is replayed on the dense traces of the
very prompts timed live, with the live run's max_new_tokens, and the two decode phases are compared: the
predicted decode tokens/s over the measured one, and the predicted speedup over `none` over the measured
one, each with a paired bootstrap interval over prompts. Replay also says which steps each run takes, so
the share of prompts whose replayed steps, drafted and accepted counts equal the live run's is reported:
where they differ the continuation differed (a numerics-dependent tie), not the cost model.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from speckv.predictor.stats import paired_ratio
from speckv.profiling.errors import SpeckvError
from speckv.profiling.replay import Trace, replay

UNITS = ("compression", "prompt_id")


def replayed_live_runs(
    live: pd.DataFrame, traces: list[Trace], tuned: dict, make, costs: dict, max_new_tokens: int
) -> pd.DataFrame:
    """One replay row per live row of our loop (transformers' runs have no replay): the same controller
    on the same prompt's test trace."""
    by_key = {(t.compression, t.prompt_id): t for t in traces if t.split == "test"}
    ours = live[~live["policy"].str.startswith("hf-")]
    rows = []
    for (compression, policy), runs in ours.groupby(["compression", "policy"], sort=False):
        spec = tuned.get(compression, {}).get(policy, policy)
        for prompt_id in runs["prompt_id"]:
            trace = by_key.get((compression, prompt_id))
            if trace is None:
                raise SpeckvError(
                    f"live prompt {prompt_id} has no {compression} test trace: profile.trace_per_task.test "
                    "must cover evaluate.live_per_task"
                )
            result = replay(make(spec, compression), trace, costs[compression], max_new_tokens)
            rows.append(
                {
                    "compression": compression,
                    "policy": policy,
                    "prompt_id": prompt_id,
                    "decode_tokens": result.decode_tokens,
                    "decode_s": result.decode_ms / 1e3,
                    "ttft_s": result.ttft_ms / 1e3,
                    "steps": len(result.gammas),
                    "drafted": sum(result.gammas),
                    "accepted": sum(result.accepts),
                }
            )
    return pd.DataFrame(rows)


def _rates(frame: pd.DataFrame, idx: np.ndarray | slice) -> np.ndarray:
    tokens, seconds = frame["decode_tokens"].to_numpy(float), frame["decode_s"].to_numpy(float)
    return tokens[idx].sum(-1) / seconds[idx].sum(-1)


def _speedup_error(pairs: dict[str, pd.DataFrame], n_boot: int, level: float, seed: int) -> dict:
    """Replayed and live speedups of a policy over `none` on the same prompts, and replayed ÷ live with a
    paired bootstrap CI."""
    n = len(pairs["live"])
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))

    def speedups(ix):
        predicted = _rates(pairs["replay"], ix) / _rates(pairs["replay_none"], ix)
        measured = _rates(pairs["live"], ix) / _rates(pairs["live_none"], ix)
        return predicted, measured

    predicted, measured = speedups(slice(None))
    boot_predicted, boot_measured = speedups(idx)
    tail = (1.0 - level) / 2
    low, high = np.quantile(boot_predicted / boot_measured, [tail, 1.0 - tail])
    return {
        "predicted_vs_none": float(predicted),
        "measured_vs_none": float(measured),
        "vs_none_ratio": float(predicted / measured),
        "vs_none_low": float(low),
        "vs_none_high": float(high),
    }


def fidelity(
    live: pd.DataFrame, replayed: pd.DataFrame, n_boot: int = 2000, level: float = 0.95, seed: int = 0
) -> dict:
    """Per compression and live policy: replay-predicted and live-measured decode tokens/s, their ratio,
    the same for the speedup over `none`, TTFT both ways; and the largest errors over all of them."""
    rows = []
    for (compression, policy), predicted in replayed.groupby(["compression", "policy"], sort=False):
        measured = live[(live["compression"] == compression) & (live["policy"] == policy)]
        both = pd.concat([predicted.assign(source="replay"), measured.assign(source="live")])
        ci = paired_ratio(
            both,
            "replay",
            "live",
            time_col="decode_s",
            tokens_col="decode_tokens",
            units=UNITS,
            policy_col="source",
            n_boot=n_boot,
            level=level,
            seed=seed,
        )
        merged = predicted.merge(measured, on="prompt_id", suffixes=("_replay", "_live"))
        same = (
            (merged["steps_replay"] == merged["steps_live"])
            & (merged["drafted_replay"] == merged["drafted_live"])
            & (merged["accepted_replay"] == merged["accepted_live"])
        )
        row = {
            "compression": compression,
            "policy": policy,
            "prompts": ci.n,
            "predicted_tokens_per_s": _rates(predicted, slice(None)),
            "measured_tokens_per_s": _rates(measured, slice(None)),
            "ratio": ci.ratio,
            "low": ci.low,
            "high": ci.high,
            "predicted_ttft_s": float(predicted["ttft_s"].median()),
            "measured_ttft_s": float(measured["ttft_s"].median()),
            "same_decisions": float(same.mean()),
        }
        if policy != "none":
            order = measured["prompt_id"].tolist()
            pick = {
                "replay": predicted,
                "replay_none": replayed[
                    (replayed["compression"] == compression) & (replayed["policy"] == "none")
                ],
                "live": measured,
                "live_none": live[(live["compression"] == compression) & (live["policy"] == "none")],
            }
            pairs = {k: v.set_index("prompt_id").loc[order].reset_index() for k, v in pick.items()}
            row.update(_speedup_error(pairs, n_boot, level, seed))
        rows.append(row)
    errors = [abs(r["ratio"] - 1.0) for r in rows]
    ratio_errors = [abs(r["vs_none_ratio"] - 1.0) for r in rows if "vs_none_ratio" in r]
    return {
        "table": rows,
        "max_abs_error": max(errors) if errors else None,
        "ratio_max_abs_error": max(ratio_errors) if ratio_errors else None,
    }
