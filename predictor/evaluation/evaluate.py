"""The evaluation stage as one library call: dev tuning, replay on dev/test, live runs, statistics, promotion.

Everything chosen (best fixed gamma, thresholds) is chosen by replay on dev prompts, per compression; test
prompts are only measured. Replay covers every policy and compression; live wall-clock runs cover the
subset in `live_controllers`, because each costs real decoding time.

Its parts: the policy roles, their replay and dev tuning in `tuning.py`, the comparison tables (ratios, gap
shares, MLP against its rivals) in `comparisons.py`, the promotion gate in `promotion.py`, live runs in
`live.py`; this module holds the config, runs them in order and writes the outputs (`run_evaluation`).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from speckv.predictor.evaluation.comparisons import LIVE_BASES, compare, gap_shares, mlp_versus
from speckv.predictor.evaluation.fidelity import fidelity, replayed_live_runs
from speckv.predictor.evaluation.promotion import alias_version, promotion
from speckv.predictor.evaluation.tuning import (
    FIRST_TOKEN_ORACLE,
    TUNED_ROLES,
    PolicyFactory,
    replay_policies,
    run_replay,
    tune_on_dev,
)
from speckv.predictor.stats import paired_ratio
from speckv.profiling.atomic import atomic_path, write_text
from speckv.profiling.costmodel import CostModel, StepCosts
from speckv.profiling.errors import SpeckvError
from speckv.profiling.replay import load_traces

__all__ = ["EvaluateConfig", "alias_version", "load_costs", "promotion", "run_evaluation"]

log = logging.getLogger(__name__)


@dataclass
class EvaluateConfig:
    traces_dir: str = "artifacts/profile/traces"  # dense greedy traces, hive-partitioned compression=/task=
    calibrate_dir: str = "artifacts/calibrate"  # cost models {compression}.json
    export_dir: str = "artifacts/predictor/export"  # the MLP export evaluated (and promoted if it pays)
    prompts: str = "artifacts/prompts/prompts.jsonl"  # tokenized prompts; live runs use the test split
    out_dir: str = "artifacts/eval"
    target: str = "default"
    draft: str = "default"
    draft_compression: str | None = None  # null: the draft's own dtype; same: the target's; or a compression
    hf_draft: str | None = None  # the standalone draft transformers' assisted generation runs (None: `draft`)
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
    live_calibration_prompts: int = 6  # dev prompts calibrated beside the live runs (live_clock.py); 0: off
    live_calibration_tokens: int = 32  # tokens per such calibration run (as calibrate.max_new_tokens)
    threads: int = 1
    cpu_kernels: bool = (
        True  # few-row fp32 kernels (profiling/kernels.py), float32 int8/nf4 weights (quant_kernels.py)
    )
    n_boot: int = 2000
    ci_level: float = 0.95
    seed: int = 0
    promote: bool = True
    tracking_uri: str | None = None
    overhead_calls: int = 20000

    @property
    def bootstrap(self) -> dict[str, Any]:
        """The keyword arguments of every paired bootstrap CI the stage reports."""
        return {"n_boot": self.n_boot, "level": self.ci_level, "seed": self.seed}

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
        if self.live_calibration_prompts < 0 or self.live_calibration_tokens < 2:
            problems.append("live_calibration_prompts >= 0 and live_calibration_tokens >= 2 required")
        if not 0 < self.ci_level < 1:
            problems.append("ci_level must be in (0, 1)")
        if problems:
            raise SpeckvError("[evaluate] " + "; ".join(problems))


def _atomic_parquet(frame: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)


def decision_overhead_ms(export_dir: str, calls: int) -> float:
    """ms per drafted token of the MLP controller's decisions on the real export (as bench_overhead)."""
    from speckv.predictor.overhead import decision_ms
    from speckv.predictor.runtime import load_export

    return decision_ms(load_export(export_dir), calls)


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


def run_live_all(
    config: EvaluateConfig, tuned: dict, make, costs: dict[str, StepCosts]
) -> tuple[pd.DataFrame, dict[str, CostModel]]:
    """Live runs on test prompts for every compression in live_controllers (empty when nothing is asked),
    and per compression the cost model measured beside them on dev prompts (live_clock.py; none when
    live_calibration_prompts is 0)."""
    import torch
    from speckv.data.prompts import load_prompt_file
    from speckv.predictor.evaluation.live import run_live
    from speckv.predictor.evaluation.live_clock import LiveClock
    from speckv.profiling.calibrate import calibration_prompts
    from speckv.profiling.decode import DecodeConfig
    from speckv.profiling.models import eos_ids

    if config.live_per_task == 0 or not config.live_controllers:
        return pd.DataFrame(), {}
    torch.set_num_threads(config.threads)
    prompts = load_prompt_file(Path(config.prompts), splits=["test"], per_task=config.live_per_task)
    if not prompts:
        raise SpeckvError(f"{config.prompts} holds no test prompts")
    clock_prompts = []
    if config.live_calibration_prompts:
        dev = [p["input_ids"] for p in load_prompt_file(Path(config.prompts), splits=["dev"])]
        if not dev:
            raise SpeckvError(f"{config.prompts} holds no dev prompts to calibrate beside the live runs")
        clock_prompts = calibration_prompts(dev, config.live_calibration_prompts)
    rows, clocks = [], {}
    for compression, specs in config.live_controllers.items():
        pair, roles, run_of = _live_roles(config, tuned, make, compression, specs)
        decode = DecodeConfig(
            max_new_tokens=config.max_new_tokens,
            gamma_max=config.gamma_max,
            eos_token_ids=eos_ids(pair.tokenizer, pair.target),
        )
        clock = None
        if clock_prompts:
            clock = LiveClock(
                pair, clock_prompts, config.gamma_max, config.live_calibration_tokens, len(prompts) + 1
            )
        rows += run_live(pair, prompts, roles, decode, config.warmup_tokens, run_of, clock)
        if clock is not None:
            clocks[compression] = clock.model(costs[compression])
        del pair, roles, clock
    return pd.DataFrame(rows), clocks


def _live_roles(config: EvaluateConfig, tuned: dict, make, compression: str, specs: list[str]):
    """The pair at `compression` and the live roles of `specs` on it: (pair, roles, run_of)."""
    from speckv.predictor.evaluation.live import HF_ROLES, Roles, hf_role
    from speckv.profiling.models import draft_compression_for, load_pair, standalone_assistant

    draft_compression = draft_compression_for(config.draft_compression, compression)
    pair = load_pair(
        config.target, config.draft, compression, config.device, config.cpu_kernels, draft_compression
    )
    roles: Roles = {}
    run_of: dict[str, str] = {}  # a role tuned to the same controller as an earlier one shares its run
    concrete_role: dict[str, str] = {}
    assistant = None
    if any(spec in HF_ROLES for spec in specs):
        assistant = standalone_assistant(
            pair, config.hf_draft or config.draft, config.draft, config.cpu_kernels
        )
    for spec in specs:
        if spec in HF_ROLES:
            # hf-threshold: transformers' own confidence stop at our dev-tuned threshold
            tuned_threshold = tuned.get(compression, {}).get("threshold:tuned", "threshold:")
            value = tuned_threshold.split(":", 1)[1].removesuffix("+trim")
            roles[spec] = hf_role(spec, config.gamma_max, float(value) if value else None, assistant)
        else:
            concrete = tuned.get(compression, {}).get(spec, spec) if spec in TUNED_ROLES else spec
            if spec in TUNED_ROLES and spec != "mlp" and compression not in tuned:
                raise SpeckvError(f"live {spec} on {compression} needs dev traces of {compression}")
            if concrete in concrete_role:  # e.g. best-fixed tuned to `none`: a second run adds only noise
                run_of[spec] = concrete_role[concrete]
                continue
            concrete_role[concrete] = spec
            roles[spec] = make(concrete, compression)
    return pair, roles, run_of


def live_comparisons(live: pd.DataFrame, config: EvaluateConfig, time_col: str, tokens_col: str) -> dict:
    """Live tokens/s per role against `none`, and the MLP against every other live role, timed by
    `time_col` over `tokens_col` (the decode phase, or end to end)."""
    roles = list(dict.fromkeys(live["policy"]))
    out = {
        "vs_none": compare(live, roles, "none", time_col, config, by=("compression",), tokens_col=tokens_col),
        "vs_none_by_task": compare(
            live, roles, "none", time_col, config, by=("compression", "task"), tokens_col=tokens_col
        ),
        "ratios": {},
        "lossless": bool(live.loc[~live["policy"].str.startswith("hf-"), "matches_none"].all()),
        "hf_matches_none": bool(live.loc[live["policy"].str.startswith("hf-"), "matches_none"].all()),
    }
    for base in LIVE_BASES:
        if "mlp" in roles and base in roles:
            ci = paired_ratio(live, "mlp", base, time_col=time_col, tokens_col=tokens_col, **config.bootstrap)
            out["ratios"][f"mlp_vs_{base}"] = ci.as_dict()
    return out


def live_fidelity(
    summary: dict, live: pd.DataFrame, traces, tuned: dict, make, costs: dict, live_models: dict, config
) -> None:
    """summary["fidelity"]: every live run of our loop replayed on its test trace under the cost model
    measured beside the live runs (when every live compression has one), and under the calibrate stage's
    model (`tuning_model`, with the `drift` between the two); summary["live_cost_models"]."""
    from speckv.predictor.evaluation.live_clock import drift

    def measure(step_costs: dict) -> dict | None:
        replayed = replayed_live_runs(live, traces, tuned, make, step_costs, config.max_new_tokens)
        if replayed.empty:
            return None
        return fidelity(live, replayed, config.n_boot, config.ci_level, config.seed)

    stage = measure(costs)
    if stage is None:
        return
    compressions = set(live["compression"])
    if live_models and compressions <= set(live_models):
        measured = {c: m.step_costs(config.gamma_max) for c, m in live_models.items()}
        result = measure({**costs, **measured})
        result["cost_model"] = "measured beside the live runs"
        result["tuning_model"] = stage
        result["drift"] = {c: drift(costs[c], measured[c]) for c in sorted(measured)}
        summary["live_cost_models"] = {c: asdict(m) for c, m in live_models.items()}
    else:
        result = {**stage, "cost_model": "calibrate stage"}
    summary["fidelity"] = result
    log.info(
        "fidelity (%s): decode tokens/s max |predicted/measured - 1| %.3f, speedup over none %s",
        result["cost_model"],
        result["max_abs_error"],
        result["ratio_max_abs_error"],
    )


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

    live_frame, live_models = run_live_all(config, tuned, make, costs)
    if not live_frame.empty:
        # headline: the decode phase (what a gamma controller controls); end to end beside it
        summary["live"] = live_comparisons(live_frame, config, "decode_s", "decode_tokens")
        summary["live_e2e"] = live_comparisons(live_frame, config, "wall_s", "new_tokens")
        summary["live"]["ttft_s"] = {
            "all": live_frame.groupby("policy", sort=False)["ttft_s"].median().to_dict(),
            **{
                str(c): g.groupby("policy", sort=False)["ttft_s"].median().to_dict()
                for c, g in live_frame.groupby("compression")
            },
        }
        live_fidelity(summary, live_frame, traces, tuned, make, costs, live_models, config)
    summary["wall_s"] = time.perf_counter() - started

    out_dir.mkdir(parents=True, exist_ok=True)
    _atomic_parquet(replay_frame, out_dir / "replay.parquet")
    _atomic_parquet(live_frame, out_dir / "live.parquet")  # empty without live runs: DVC expects the file
    write_text(out_dir / "summary.json", json.dumps(summary, indent=2, default=float))
    return summary
