"""The evaluation's comparison tables: pooled tokens/s and paired-bootstrap ratios per role and group, each
policy's share of the oracle's gain over best fixed, and the MLP against every causal rival.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pandas as pd
from speckv.predictor.stats import gap_share, paired_ratio, pooled_rate

if TYPE_CHECKING:
    from speckv.predictor.evaluation.evaluate import EvaluateConfig

# Live roles the MLP is set against (when they ran), and the name each takes in metrics.json.
LIVE_BASES = {
    "best-fixed": "best_fixed",
    "none": "none",
    "threshold:best": "threshold_best",
    "hf-assisted": "hf_assisted",
    "hf-heuristic": "hf_heuristic",
    "hf-threshold": "hf_threshold",
    "fixed:4": "fixed4",
}


def compare(
    frame: pd.DataFrame,
    roles: list[str],
    base: str,
    time_col: str,
    config: EvaluateConfig,
    by: tuple[str, ...] = (),
    tokens_col: str = "new_tokens",
) -> dict:
    """Pooled tokens/s per role and its ratio to `base` (paired bootstrap CI), overall and per `by` group."""
    seconds = frame[time_col] / (1000.0 if time_col == "model_ms" else 1.0)
    frame = frame.assign(_s=seconds)
    groups = [("all", frame)] + (
        [(k if isinstance(k, str) else "/".join(k), g) for k, g in frame.groupby(list(by))] if by else []
    )
    out = {}
    for name, group in groups:
        entry = {}
        for role in roles:
            rows = group[group["policy"] == role]
            if rows.empty:
                continue
            entry[role] = {"tokens_per_s": pooled_rate(rows[tokens_col].to_numpy(), rows["_s"].to_numpy())}
            if role != base and (group["policy"] == base).any():
                ci = paired_ratio(group, role, base, time_col="_s", tokens_col=tokens_col, **config.bootstrap)
                entry[role][f"vs_{base}"] = ci.as_dict()
        out[name] = entry
    return out


def report_groups(frame: pd.DataFrame, tasks: bool) -> list[tuple[str, pd.DataFrame]]:
    """("all", frame), then one group per compression, then (with `tasks`) per compression/task."""
    groups = [("all", frame)] + [(str(c), g) for c, g in frame.groupby("compression")]
    if tasks:
        groups += [(f"{c}/{t}", g) for (c, t), g in frame.groupby(["compression", "task"])]
    return groups


def gap_shares(frame: pd.DataFrame, roles: list[str], config: EvaluateConfig) -> dict[str, dict[str, dict]]:
    """Per policy: the share of the oracle-over-best-fixed gap it closes, over all test traces, per
    compression and per compression/task (paired bootstrap over prompts)."""
    groups = report_groups(frame, tasks=True)
    out: dict[str, dict[str, dict]] = {}
    for role in roles:
        if role in ("best-fixed", "oracle") or role not in set(frame["policy"]):
            continue
        out[role] = {
            name: gap_share(group, role, "best-fixed", "oracle", time_col="_s", **config.bootstrap)
            for name, group in groups
        }
    return out


# The causal policies the MLP must match or beat (hindsight ones and the MLP itself excluded).
CAUSAL_RIVALS = ("best-fixed", "heuristic", "threshold:tuned", "threshold:tuned+trim", "entropy:tuned")
CAUSAL_RIVALS += ("entropy:tuned+trim", "paper")


def mlp_versus(frame: pd.DataFrame, roles: list[str], config: EvaluateConfig) -> dict[str, dict[str, dict]]:
    """MLP ÷ each causal rival on test replay (paired bootstrap over prompts), overall and per compression."""
    groups = report_groups(frame, tasks=False)
    rivals = [r for r in CAUSAL_RIVALS if r in roles and r in set(frame["policy"])]
    return {
        name: {
            rival: paired_ratio(group, "mlp", rival, time_col="_s", **config.bootstrap).as_dict()
            for rival in rivals
        }
        for name, group in groups
    }
