"""Every policy role replayed on traces, and the dev tuning that picks each tuned role's setting by that
replay: the controllers behind the roles, the per-trace replay rows, the dev search and the full replay.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from speckv.predictor.stats import pooled_rate
from speckv.profiling.controllers import Controller, parse_controller
from speckv.profiling.errors import SpeckvError
from speckv.profiling.replay import ReplayResult, Trace, oracle, replay

if TYPE_CHECKING:
    from speckv.predictor.evaluation.evaluate import EvaluateConfig

log = logging.getLogger(__name__)

# Roles resolved after dev tuning; every other live entry is a parse_controller spec or an hf-* role.
TUNED_ROLES = (
    "best-fixed",
    "threshold:tuned",
    "entropy:tuned",
    "threshold:tuned+trim",
    "entropy:tuned+trim",
    "threshold:best",  # the better of threshold:tuned and threshold:tuned+trim on dev: the live run's threshold
    "mlp",
)
FIRST_TOKEN_ORACLE = "first-token-oracle"  # replay only: hindsight on the draft-or-not decision alone


class PolicyFactory:
    """Builds fresh controllers for evaluation roles. Every controller spec is read by the engine's one
    `parse_controller` (the MLP as `mlp:<export_dir>`, its export loaded once); the roles only evaluation
    knows — the paper's formulation and the first-token oracle's hindsight wrapper — are built here."""

    def __init__(
        self, gamma_max: int, export_dir: str | None, costs: dict[str, list[float]], paper=None
    ) -> None:
        self.gamma_max = gamma_max
        self.export_dir = export_dir
        self.costs = costs
        self.paper = paper  # (regressor, default aggregates) of the paper's formulation, or None

    def __call__(self, spec: str, compression: str) -> Controller:
        if spec == "mlp":
            controller = parse_controller(f"mlp:{self.export_dir}", self.gamma_max, compression)
            controller.name = "mlp"  # the role's name in every table
            return controller
        if spec.startswith(FIRST_TOKEN_ORACLE + ":"):
            from speckv.profiling.replay import FirstTokenOracle

            return FirstTokenOracle(self(spec.split(":", 1)[1], compression))
        if spec == "paper":
            from speckv.predictor.evaluation.paper import PaperController

            if self.paper is None:
                raise SpeckvError("the paper controller needs train traces (its regressor's training data)")
            return PaperController(*self.paper, self.costs[compression], self.gamma_max, compression)
        return parse_controller(spec, self.gamma_max, compression)


def replay_rows(
    traces: list[Trace],
    spec: str,
    policy: str,
    make,
    costs: dict[str, list[float]],
    max_new: int | None = None,
) -> list[dict]:
    """One row per trace: `policy` (a role name) replayed with controller `spec` (or the oracle)."""
    rows = []
    for trace in traces:
        cost = costs[trace.compression]
        if spec == "oracle":
            result = oracle(trace, cost, max_new)
        else:
            result = replay(make(spec, trace.compression), trace, cost, max_new)
        rows.append(_row(trace, policy, spec, result))
    return rows


def _row(trace: Trace, policy: str, spec: str, result: ReplayResult) -> dict:
    return {
        "split": trace.split,
        "compression": trace.compression,
        "task": trace.task,
        "prompt_id": trace.prompt_id,
        "policy": policy,
        "spec": spec,
        "new_tokens": result.new_tokens,
        "steps": len(result.gammas),
        "drafted": sum(result.gammas),
        "accepted": sum(result.accepts),
        "model_ms": result.model_ms,
        "goodput": result.goodput,
        "decode_tokens": result.decode_tokens,
        "decode_ms": result.decode_ms,
        "ttft_ms": result.ttft_ms,
        "gammas": result.gammas,
        "accepts": result.accepts,
    }


def _goodput(rows: list[dict]) -> float:
    return 1000.0 * pooled_rate(
        np.array([r["new_tokens"] for r in rows]), np.array([r["model_ms"] for r in rows])
    )


def tune_on_dev(
    dev: list[Trace], make, costs: dict[str, list[float]], config: EvaluateConfig
) -> dict[str, dict[str, Any]]:
    """Per compression: the best of none/fixed:K, the best threshold and entropy stop, by dev replay."""
    tuned: dict[str, dict[str, Any]] = {}
    for compression in sorted({t.compression for t in dev}):
        traces = [t for t in dev if t.compression == compression]
        candidates = {
            "best-fixed": ["none", *(f"fixed:{k}" for k in range(1, config.gamma_max + 1))],
            "threshold:tuned": [f"threshold:{p:g}" for p in config.threshold_grid],
            "entropy:tuned": [f"entropy:{h:g}" for h in config.entropy_grid],
            "threshold:tuned+trim": [f"threshold:{p:g}+trim" for p in config.threshold_grid],
            "entropy:tuned+trim": [f"entropy:{h:g}+trim" for h in config.entropy_grid],
        }
        candidates["threshold:best"] = candidates["threshold:tuned"] + candidates["threshold:tuned+trim"]
        tuned[compression] = {"dev_goodput": {}}
        for role, specs in candidates.items():
            scores = {
                s: _goodput(replay_rows(traces, s, role, make, costs, config.trace_max_new_tokens))
                for s in specs
            }
            best = max(specs, key=lambda s: scores[s])  # ties: the first, i.e. the cheapest setting
            tuned[compression][role] = best
            tuned[compression]["dev_goodput"].update(scores)
        tuned[compression]["mlp"] = "mlp"
        tuned[compression][FIRST_TOKEN_ORACLE] = (
            f"{FIRST_TOKEN_ORACLE}:{tuned[compression]['threshold:tuned']}"
        )
        log.info(
            "dev tuning %s: %s",
            compression,
            {k: v for k, v in tuned[compression].items() if k != "dev_goodput"},
        )
    return tuned


def replay_policies(gamma_max: int, has_paper: bool) -> list[str]:
    """Role names of every policy replayed, in report order."""
    roles = ["none", *(f"fixed:{k}" for k in range(1, gamma_max + 1)), "best-fixed", "heuristic"]
    roles += [
        "threshold:0.4",
        "threshold:tuned",
        "threshold:tuned+trim",
        "entropy:tuned",
        "entropy:tuned+trim",
    ]
    return roles + (["paper"] if has_paper else []) + ["mlp", FIRST_TOKEN_ORACLE, "oracle"]


def run_replay(
    traces: list[Trace],
    tuned: dict,
    make,
    costs: dict[str, list[float]],
    roles: list[str],
    max_new: int | None = None,
) -> pd.DataFrame:
    rows = []
    for compression in sorted({t.compression for t in traces}):
        if compression not in tuned:
            raise SpeckvError(
                f"no dev traces for compression {compression!r}: nothing to tune its policies on"
            )
        subset = [t for t in traces if t.compression == compression]
        for role in roles:
            spec = tuned[compression].get(role, role)
            rows += replay_rows(subset, spec, role, make, costs, max_new)
    return pd.DataFrame(rows)
