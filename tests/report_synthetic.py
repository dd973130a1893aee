"""A small synthetic evaluation for the report tests (and a screenshot of the page): a real replay-only
`run_evaluation` on synthetic traces, plus live runs and gap shares with values chosen here, so the verdict
and the numbers the report must show are known.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from eval_synthetic import replay_only_config
from speckv.predictor.evaluation.evaluate import run_evaluation
from speckv.predictor.evaluation.report import ReportConfig

COMPRESSIONS = ("fp32", "int8")
TASKS = ("chat", "code")  # eval_synthetic's tasks
# Live tokens/s per policy: MLP 10% faster than best fixed, so the live verdict is "pays".
LIVE_RATE = {"none": 10.0, "best-fixed": 10.0, "fixed:4": 8.0, "mlp": 11.0}


def _ci(ratio: float, half_width: float = 0.05) -> dict[str, float]:
    return {"ratio": ratio, "low": ratio - half_width, "high": ratio + half_width, "n": 4}


def live_frame() -> pd.DataFrame:
    rows = []
    for compression in COMPRESSIONS:
        for task in TASKS:
            for policy, rate in LIVE_RATE.items():
                rows.append(
                    {
                        "prompt_id": f"{task}/test-0",
                        "task": task,
                        "compression": compression,
                        "policy": policy,
                        "spec": "fixed:1" if policy == "best-fixed" else policy,
                        "new_tokens": 32,
                        "wall_s": 0.5 + 31 / rate,
                        "ttft_s": 0.5,
                        "decode_tokens": 31,
                        "decode_s": 31 / rate,
                        "steps": 20,
                        "drafted": 0 if policy == "none" else 24,
                        "accepted": 0 if policy == "none" else 12,
                        "matches_none": True,
                    }
                )
    return pd.DataFrame(rows)


def live_summary() -> dict:
    def by_group(groups: list[str]) -> dict:
        return {
            g: {
                p: {"tokens_per_s": r, **({"vs_none": _ci(r / LIVE_RATE["none"])} if p != "none" else {})}
                for p, r in LIVE_RATE.items()
            }
            for g in groups
        }

    tasks = [f"{c}/{t}" for c in COMPRESSIONS for t in TASKS]
    return {
        "vs_none": by_group(["all", *COMPRESSIONS]),
        "vs_none_by_task": by_group(["all", *tasks]),
        "ratios": {
            f"mlp_vs_{base}": _ci(LIVE_RATE["mlp"] / LIVE_RATE[base])
            for base in ("best-fixed", "fixed:4", "none")
        },
        "lossless": True,
        "hf_matches_none": True,
        "ttft_s": {"all": {p: 0.5 for p in LIVE_RATE}},
    }


def fidelity_summary() -> dict:
    """Replay against live per compression and policy; fp32's mlp is 8% off, its speedup 4% off."""
    rows = []
    for compression in COMPRESSIONS:
        for policy, rate in LIVE_RATE.items():
            off = 1.08 if (compression, policy) == ("fp32", "mlp") else 1.01
            row = {
                "compression": compression,
                "policy": policy,
                "prompts": 4,
                "predicted_tokens_per_s": rate * off,
                "measured_tokens_per_s": rate,
                "ratio": off,
                "low": off - 0.02,
                "high": off + 0.02,
                "predicted_ttft_s": 0.45,
                "measured_ttft_s": 0.5,
                "same_decisions": 1.0,
            }
            if policy != "none":
                vs = 1.04 if off > 1.05 else 1.0
                measured = rate / LIVE_RATE["none"]
                row.update(
                    predicted_vs_none=measured * vs,
                    measured_vs_none=measured,
                    vs_none_ratio=vs,
                    vs_none_low=vs - 0.01,
                    vs_none_high=vs + 0.01,
                )
            rows.append(row)
    # the calibrate stage's model, read against the same runs: the machine ran 20% faster live
    tuning = [
        {**r, "ratio": r["ratio"] * 1.25, "low": r["low"] * 1.25, "high": r["high"] * 1.25} for r in rows
    ]
    return {
        "table": rows,
        "max_abs_error": 0.08,
        "ratio_max_abs_error": 0.04,
        "cost_model": "measured beside the live runs",
        "tuning_model": {"table": tuning, "max_abs_error": 0.35, "ratio_max_abs_error": 0.04},
        "drift": {
            c: {"step_ratio": [0.8] * 7, "step_ratio_min": 0.78, "step_ratio_max": 0.82, "draft_ratio": 0.9}
            for c in COMPRESSIONS
        },
    }


def gap_share() -> dict:
    """policy -> group -> share; `first-token-oracle` and a `+trim` policy as the evaluation may add them."""
    shares = {"mlp": 0.40, "threshold:tuned": -0.30, "first-token-oracle": 0.65, "mlp+trim": 0.05}
    groups = ["all", *COMPRESSIONS, *(f"{c}/{t}" for c in COMPRESSIONS for t in TASKS)]
    return {
        policy: {g: {"estimate": s, "low": s - 0.2, "high": s + 0.2} for g in groups}
        for policy, s in shares.items()
    }


# Gamma by batch size: the best fixed gamma shrinks as the batch grows; the MLP at batch 4 is 2% slower than none
BATCH_BEST = {"fp32": {"1": 3, "2": 2, "4": 0}, "int8": {"1": 2, "2": 1, "4": 0}}


def _batch_entry(best: int, rate: float) -> dict:
    rates = {"none": rate, "best-fixed": rate * 1.1, "batch-1-best": rate * 0.9, "mlp": rate * 1.05}
    if best == 0:
        rates["best-fixed"] = rate
    return {
        "dev_rates": {str(g): rate for g in range(5)},
        "best_gamma": best,
        "test_rates": rates,
        "mlp_dev_rates": {"0.0": rate, "0.5": rate * 1.01, "1.0": rate},
        "mlp_share_exponent": 0.5,
    }


def _live_entry(rate: float, batches: int = 2) -> dict:
    def policy(ratio: float, error: float) -> dict:
        return {
            "measured_tokens_per_s": rate * ratio,
            "replay_tokens_per_s": rate * ratio * (1 + error),
            "replay_error": error,
            "tuning_model_tokens_per_s": rate * ratio * (1 + 2 * error),
            "tuning_model_error": 2 * error,
            "lossless_batches": batches,
            "batches": batches,
            "vs_none": {**_ci(ratio), "n": batches},
            "vs_batch_1_best": {**_ci(ratio / 0.9), "n": batches},
        }

    return {
        "none": policy(1.0, 0.01),
        "best-fixed": policy(1.0, -0.02),
        "mlp": policy(0.98, 0.03),
        "batch-1-best": {**policy(0.9, -0.04), "runs_of": "batch-1-best"},
    }


def write_batch(root: Path) -> Path:
    """`speckv batch`'s outputs under root/batch: summary, batched cost models and the schedule."""
    out = root / "batch"
    out.mkdir(parents=True, exist_ok=True)
    summary = {
        "config": {"dev_per_task": 2, "threads": 2, "max_new_tokens": 32},
        "cpu": {"model": "Test CPU", "capability": "AVX2"},
        "compressions": {
            c: {
                "best_gamma": best,
                "by_batch_size": {b: _batch_entry(g, 10.0 * int(b)) for b, g in best.items()},
                "live": {"1": _live_entry(10.0), "4": _live_entry(40.0, batches=1)},
                "fidelity_max_abs_error": 0.04,
            }
            for c, best in BATCH_BEST.items()
        },
    }
    (out / "summary.json").write_text(json.dumps(summary))
    for c in BATCH_BEST:
        models = {b: {"step_ms": [10.0 * int(b) + 2 * k * int(b) for k in range(5)]} for b in BATCH_BEST[c]}
        (out / f"{c}_batch.json").write_text(json.dumps({"compression": c, "models": models}))
    (out / "speculation_schedule.json").write_text(json.dumps({"measured_with": "test", "compressions": {}}))
    return out


def write_evaluation(root: Path, live: bool = True, batch: bool = False) -> ReportConfig:
    """Evaluation outputs under root/eval (and cost models under root/calibrate, with `batch` speckv batch's
    under root/batch); the report's config."""
    settings = {"gamma_max": 6, "threshold_grid": [0.3, 0.6], "entropy_grid": [0.5, 1.5], "n_boot": 200}
    config = replay_only_config(root, 4, COMPRESSIONS, **settings)
    summary = run_evaluation(config)
    summary["replay"]["gap_share"] = gap_share()
    if live:
        summary["live"] = live_summary()
        summary["live_e2e"] = live_summary()
        summary["fidelity"] = fidelity_summary()
        summary["config"]["live_controllers"] = {c: list(LIVE_RATE) for c in COMPRESSIONS}
        live_frame().to_parquet(root / "eval" / "live.parquet", index=False)
    (root / "eval" / "summary.json").write_text(json.dumps(summary, default=float))
    return ReportConfig(
        eval_dir=str(root / "eval"),
        predictor_dir=str(root / "predictor"),
        calibrate_dir=str(root / "calibrate"),
        out_dir=str(root / "report"),
        batch_dir=str(write_batch(root) if batch else root / "batch"),
    )
