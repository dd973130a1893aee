"""The evaluation stage as one library call: dev tuning, replay on dev/test, live runs, statistics, promotion.

Everything chosen (best fixed gamma, thresholds) is chosen by replay on dev prompts, per compression; test
prompts are only measured. Replay covers every policy and compression; live wall-clock runs cover the
subset in `live_controllers`, because each costs real decoding time.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from speckv.predictor.stats import gap_share, paired_ratio, pooled_rate
from speckv.profiling.atomic import atomic_path, write_text
from speckv.profiling.controllers import Controller, parse_controller
from speckv.profiling.costmodel import CostModel, StepCosts
from speckv.profiling.errors import SpeckvError
from speckv.profiling.replay import ReplayResult, Trace, load_traces, oracle, replay

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


@dataclass
class EvaluateConfig:
    traces_dir: str = "artifacts/profile/traces"  # dense greedy traces, hive-partitioned compression=/task=
    calibrate_dir: str = "artifacts/calibrate"  # cost models {compression}.json
    export_dir: str = "artifacts/predictor/export"  # the MLP export evaluated (and promoted if it pays)
    prompts: str = "artifacts/prompts/prompts.jsonl"  # tokenized prompts; live runs use the test split
    out_dir: str = "artifacts/eval"
    target: str = "default"
    draft: str = "default"
    device: str | None = None
    paper: bool = True  # replay the paper's formulation (its regressor refitted on the train traces)
    gamma_max: int = 8
    trace_max_new_tokens: int | None = 64  # the profile's max_new_tokens: caps drafting as the live loop did
    threshold_grid: list[float] = field(default_factory=lambda: [round(0.05 * i, 2) for i in range(1, 20)])
    entropy_grid: list[float] = field(default_factory=lambda: [0.25 * i for i in range(1, 21)])
    live_controllers: dict[str, list[str]] = field(
        default_factory=lambda: {"fp32": ["none", "fixed:4", "best-fixed", "mlp"]}
    )
    live_per_task: int = 2
    max_new_tokens: int = 48
    warmup_tokens: int = 8
    threads: int = 1
    cpu_kernels: bool = True  # few-row fp32 linear kernels on CPU (profiling/kernels.py)
    n_boot: int = 2000
    ci_level: float = 0.95
    seed: int = 0
    promote: bool = True
    tracking_uri: str | None = None
    overhead_calls: int = 20000

    def __post_init__(self) -> None:
        problems = []
        if self.gamma_max < 1:
            problems.append("gamma_max must be >= 1")
        if not self.threshold_grid or not all(0 <= p <= 1 for p in self.threshold_grid):
            problems.append("threshold_grid must hold probabilities")
        if not self.entropy_grid or min(self.entropy_grid) < 0:
            problems.append("entropy_grid must hold non-negative entropies (nats)")
        for compression, specs in self.live_controllers.items():
            if not isinstance(specs, list) or "none" not in specs:
                problems.append(f"live_controllers.{compression} must be a list including none")
        if self.live_per_task < 0 or self.max_new_tokens < 1 or self.threads < 1 or self.n_boot < 1:
            problems.append("live_per_task >= 0, max_new_tokens, threads and n_boot >= 1 required")
        if not 0 < self.ci_level < 1:
            problems.append("ci_level must be in (0, 1)")
        if problems:
            raise SpeckvError("[evaluate] " + "; ".join(problems))


def _atomic_parquet(frame: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)


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


def compare(
    frame: pd.DataFrame,
    roles: list[str],
    base: str,
    time_col: str,
    config: EvaluateConfig,
    by: tuple[str, ...] = (),
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
            entry[role] = {"tokens_per_s": pooled_rate(rows["new_tokens"].to_numpy(), rows["_s"].to_numpy())}
            if role != base and (group["policy"] == base).any():
                ci = paired_ratio(
                    group,
                    role,
                    base,
                    time_col="_s",
                    n_boot=config.n_boot,
                    level=config.ci_level,
                    seed=config.seed,
                )
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
            name: gap_share(
                group,
                role,
                "best-fixed",
                "oracle",
                time_col="_s",
                n_boot=config.n_boot,
                level=config.ci_level,
                seed=config.seed,
            )
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
            rival: paired_ratio(
                group,
                "mlp",
                rival,
                time_col="_s",
                n_boot=config.n_boot,
                level=config.ci_level,
                seed=config.seed,
            ).as_dict()
            for rival in rivals
        }
        for name, group in groups
    }


def decision_overhead_ms(export_dir: str, calls: int) -> float:
    """ms per drafted token of the MLP controller's decisions on the real export (as bench_overhead)."""
    from speckv.predictor.bench_overhead import decision_ms
    from speckv.predictor.runtime import load_export

    return decision_ms(load_export(export_dir), calls)


def alias_version(alias: str, uri: str | None) -> str | None:
    """The registered version of speckv-gamma-predictor that `alias` points at, or None."""
    from mlflow import MlflowClient
    from speckv.predictor.registry import MODEL_NAME, tracking_uri

    resolved = tracking_uri(uri)
    try:
        return str(
            MlflowClient(tracking_uri=resolved, registry_uri=resolved)
            .get_model_version_by_alias(MODEL_NAME, alias)
            .version
        )
    except Exception:  # MLflow raises its own RestException / MlflowException for a missing name or alias
        return None


def promotion(dev_frame: pd.DataFrame, config: EvaluateConfig) -> dict[str, Any]:
    """Promote the registered candidate to `champion` iff MLP / best-fixed dev replay CI lies above 1.0."""
    ci = paired_ratio(
        dev_frame,
        "mlp",
        "best-fixed",
        time_col="model_ms",
        n_boot=config.n_boot,
        level=config.ci_level,
        seed=config.seed,
    )
    decision: dict[str, Any] = {"dev_ratio_vs_best_fixed": ci.as_dict(), "promoted": False, "version": None}
    if ci.low <= 1.0:
        decision["reason"] = (
            f"MLP / best fixed on dev replay = {ci}: CI not above 1.0, previous champion stays"
        )
        return decision
    if not config.promote:
        decision["reason"] = (
            f"MLP beats best fixed on dev ({ci}) but promotion is switched off (evaluate.promote)"
        )
        return decision
    from speckv.predictor.registry import MODEL_NAME, promote

    version = alias_version("candidate", config.tracking_uri)
    if version is None:
        decision["reason"] = f"MLP beats best fixed on dev ({ci}) but no {MODEL_NAME}@candidate is registered"
        return decision
    promote(version, "champion", uri=config.tracking_uri)
    decision.update(promoted=True, version=version, reason=f"MLP beats best fixed on dev replay: {ci}")
    return decision


def load_costs(calibrate_dir: str, compressions: list[str], gamma_max: int) -> dict[str, StepCosts]:
    costs = {}
    for c in compressions:
        cost = CostModel.load(Path(calibrate_dir) / f"{c}.json")
        if cost.gamma_max < gamma_max:
            raise SpeckvError(
                f"cost model {c} covers gamma up to {cost.gamma_max}, evaluate.gamma_max is {gamma_max}"
            )
        costs[c] = cost.step_costs(gamma_max)
    return costs


def run_live_all(config: EvaluateConfig, tuned: dict, make) -> pd.DataFrame:
    """Live runs on test prompts for every compression in live_controllers; empty when nothing is asked."""
    import torch
    from speckv.data.prompts import load_prompt_file
    from speckv.predictor.evaluation.live import HF_ROLES, HFAssisted, hf_role, run_live
    from speckv.profiling.decode import DecodeConfig
    from speckv.profiling.models import eos_ids, load_pair

    if config.live_per_task == 0 or not config.live_controllers:
        return pd.DataFrame()
    torch.set_num_threads(config.threads)
    prompts = load_prompt_file(Path(config.prompts), splits=["test"], per_task=config.live_per_task)
    if not prompts:
        raise SpeckvError(f"{config.prompts} holds no test prompts")
    rows = []
    for compression, specs in config.live_controllers.items():
        pair = load_pair(config.target, config.draft, compression, config.device, config.cpu_kernels)
        decode = DecodeConfig(
            max_new_tokens=config.max_new_tokens,
            gamma_max=config.gamma_max,
            eos_token_ids=eos_ids(pair.tokenizer, pair.target),
        )
        roles: dict[str, Controller | HFAssisted] = {}
        for spec in specs:
            if spec in HF_ROLES:
                # hf-threshold: transformers' own confidence stop at our dev-tuned threshold
                tuned_threshold = tuned.get(compression, {}).get("threshold:tuned", "threshold:")
                value = tuned_threshold.split(":", 1)[1].removesuffix("+trim")
                roles[spec] = hf_role(spec, config.gamma_max, float(value) if value else None)
            else:
                concrete = tuned.get(compression, {}).get(spec, spec) if spec in TUNED_ROLES else spec
                if spec in TUNED_ROLES and spec != "mlp" and compression not in tuned:
                    raise SpeckvError(f"live {spec} on {compression} needs dev traces of {compression}")
                roles[spec] = make(concrete, compression)
        rows += run_live(pair, prompts, roles, decode, config.warmup_tokens)
        del pair
    return pd.DataFrame(rows)


def run_evaluation(config: EvaluateConfig) -> dict[str, Any]:
    """Tune on dev, replay dev and test, run live, compare, decide promotion; write out_dir; the summary."""
    started = time.perf_counter()
    out_dir = Path(config.out_dir)
    traces = load_traces(config.traces_dir)
    gamma_max = config.gamma_max
    shortest = min(t.gamma_max for t in traces)
    if shortest < gamma_max:
        raise SpeckvError(
            f"traces hold {shortest} draft tokens per position; evaluate.gamma_max is {gamma_max}"
        )
    for trace in traces:  # longer traces are cut, so the oracle too drafts at most gamma_max
        trace.signals = trace.signals[:, :gamma_max]
    compressions = sorted({t.compression for t in traces})
    costs = load_costs(config.calibrate_dir, compressions, gamma_max)
    has_mlp = Path(config.export_dir, "model.json").is_file()
    if not has_mlp:
        raise SpeckvError(f"no predictor export at {config.export_dir} (run `speckv train`)")
    paper = None
    if config.paper and any(t.split == "train" for t in traces):
        from speckv.predictor.evaluation.paper import fit_paper_regressor

        paper = fit_paper_regressor(traces, config.seed)
    make = PolicyFactory(gamma_max, config.export_dir, costs, paper)

    dev = [t for t in traces if t.split == "dev"]
    test = [t for t in traces if t.split == "test"]
    if not dev or not test:
        raise SpeckvError(
            f"{config.traces_dir} needs dev and test traces (found {sorted({t.split for t in traces})})"
        )
    tuned = tune_on_dev(dev, make, costs, config)
    roles = replay_policies(gamma_max, paper is not None)
    replay_frame = run_replay(dev + test, tuned, make, costs, roles, config.trace_max_new_tokens)
    log.info("replayed %d policies on %d traces", len(roles), len(traces))

    summary: dict[str, Any] = {"config": asdict(config), "gamma_max": gamma_max, "tuned": tuned, "replay": {}}
    for split in ("dev", "test"):
        frame = replay_frame[replay_frame["split"] == split]
        summary["replay"][split] = {
            "vs_best_fixed": compare(frame, roles, "best-fixed", "model_ms", config, by=("compression",)),
            "vs_none_by_task": compare(frame, roles, "none", "model_ms", config, by=("compression", "task")),
        }
    summary["replay"]["test"]["by_task"] = compare(
        replay_frame[replay_frame["split"] == "test"],
        ["best-fixed", "mlp", "paper", "threshold:tuned", FIRST_TOKEN_ORACLE, "oracle"],
        "best-fixed",
        "model_ms",
        config,
        by=("compression", "task"),
    )
    test_frame = replay_frame[replay_frame["split"] == "test"].assign(_s=lambda f: f["model_ms"] / 1000.0)
    summary["replay"]["gap_share"] = gap_shares(test_frame, roles, config)
    summary["replay"]["test"]["mlp_vs"] = mlp_versus(test_frame, roles, config)
    summary["replay"]["oracle_gap_share"] = summary["replay"]["gap_share"]["mlp"]["all"]
    summary["promotion"] = promotion(replay_frame[replay_frame["split"] == "dev"], config)
    log.info("promotion: %s", summary["promotion"]["reason"])
    summary["overhead"] = {"decision_ms": decision_overhead_ms(config.export_dir, config.overhead_calls)}

    live_frame = run_live_all(config, tuned, make)
    if not live_frame.empty:
        live_roles = list(dict.fromkeys(live_frame["policy"]))
        summary["live"] = {
            "vs_none": compare(live_frame, live_roles, "none", "wall_s", config, by=("compression",)),
            "vs_none_by_task": compare(
                live_frame, live_roles, "none", "wall_s", config, by=("compression", "task")
            ),
            "ratios": {},
            "lossless": bool(
                live_frame.loc[~live_frame["policy"].str.startswith("hf-"), "matches_none"].all()
            ),
            "hf_matches_none": bool(
                live_frame.loc[live_frame["policy"].str.startswith("hf-"), "matches_none"].all()
            ),
        }
        for base in ("best-fixed", "none", "threshold:best", "hf-assisted", "hf-threshold", "fixed:4"):
            if "mlp" in live_roles and base in live_roles:
                ci = paired_ratio(
                    live_frame,
                    "mlp",
                    base,
                    time_col="wall_s",
                    n_boot=config.n_boot,
                    level=config.ci_level,
                    seed=config.seed,
                )
                summary["live"]["ratios"][f"mlp_vs_{base}"] = ci.as_dict()
    summary["wall_s"] = time.perf_counter() - started

    out_dir.mkdir(parents=True, exist_ok=True)
    _atomic_parquet(replay_frame, out_dir / "replay.parquet")
    _atomic_parquet(live_frame, out_dir / "live.parquet")  # empty without live runs: DVC expects the file
    write_text(out_dir / "summary.json", json.dumps(summary, indent=2, default=float))
    return summary
