"""Gamma by batch size: the best fixed gamma and the MLP's batch-aware stop rule at each batch size, chosen by
replay under batched cost models measured in the batched loop, proven in batched live runs.

Per compression: the pair's dense greedy traces of dev and test prompts (with the batched loop's causal
draft); a BatchCostModel calibrated at every batch size (profiling/batch_costs.py); at each batch size the
dev prompts replayed in batches (profiling/batch_replay.py) at every fixed gamma, the best kept; on the test
prompts `none`, that best gamma, batch 1's best gamma applied at every size, and the MLP whose stop rule is
batch-aware: it optimises the batch size's own cost table and weighs a row's drafted tokens by its share of
the batch (predictor.policy; the share's exponent chosen on dev prompts); then, at the live batch sizes, the
test prompts decoded in the same batches under `none`, the batch's best fixed gamma, the MLP and batch 1's
best gamma (where it differs from both fixed policies), interleaved batch by batch, decode tokens/s summed
over the batch against what replay predicted for the same batches.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from speckv.predictor.runtime import AcceptancePredictor, MLPController
from speckv.predictor.stats import paired_ratio
from speckv.profiling.batch_costs import BatchCostModel
from speckv.profiling.batch_replay import batch_goodput, compose_batches, replay_totals
from speckv.profiling.controllers import FixedGamma
from speckv.profiling.errors import SpeckvError
from speckv.profiling.replay import Trace

log = logging.getLogger(__name__)

NONE, BEST, BEST_AT_1, MLP = "none", "best-fixed", "batch-1-best", "mlp"
# the MLP's share of a batch step at batch size B is B ** -exponent, the exponent chosen on dev per B:
# 0 re-costs the batch-1 rule only, 1 charges a row's drafted tokens with the whole batch's longer step
SHARE_EXPONENTS = (0.0, 0.5, 1.0)


@dataclass
class BatchConfig:
    target: str = "default"  # target reference
    draft: str = "default-standalone"  # a causal LM draft: the batched loop runs no feature draft
    draft_compression: str | None = None  # null: the draft's own dtype; same: the target's; or fp32/int8/nf4
    compressions: list[str] = field(default_factory=lambda: ["fp32", "int8"])
    prompts: str = "artifacts/prompts/prompts.jsonl"  # tokenized prompts with splits
    export_dir: str = (
        "artifacts/predictor/export"  # the MLP export whose stop rule is re-costed per batch size
    )
    out_dir: str = "artifacts/batch"  # summary.json, {c}_batch.json, {c}_batch_live_clock.json, *.parquet
    batch_sizes: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])  # calibrated and replayed
    live_batch_sizes: list[int] = field(default_factory=lambda: [1, 4, 8])  # run live
    gamma_max: int = 8  # most tokens drafted per step
    dev_per_task: int = 4  # dev prompts per task traced: the best gamma per batch size is chosen on them
    test_per_task: int = 4  # test prompts per task traced, replayed and run live
    max_new_tokens: int = 64  # tokens per row, traced and live
    calibration_prompts: int = 6  # dev prompts of the batched calibration (narrow and wide batches)
    calibration_tokens: int = 24  # tokens per row of each calibration run
    threads: int = 2  # torch CPU threads
    cpu_kernels: bool = True  # as calibrate.cpu_kernels
    n_boot: int = 2000  # paired bootstrap resamples over batches
    ci_level: float = 0.95
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.batch_sizes, default=0) < 1 or 1 not in self.batch_sizes:
            raise SpeckvError("batch_sizes must hold 1 and sizes >= 1 (batch 1's best gamma is compared)")
        if not set(self.live_batch_sizes) <= set(self.batch_sizes):
            raise SpeckvError("every live batch size must be a calibrated one (in batch_sizes)")
        if min(self.gamma_max, self.dev_per_task, self.test_per_task, self.calibration_prompts) < 1:
            raise SpeckvError("gamma_max, dev_per_task, test_per_task and calibration_prompts must be >= 1")
        if self.calibration_tokens < self.gamma_max + 3:
            raise SpeckvError("calibration_tokens must exceed gamma_max + 2 (every gamma needs a full step)")
        if self.max_new_tokens < 2:
            raise SpeckvError("max_new_tokens must be >= 2 (the first token is not decode time)")

    @property
    def bootstrap(self) -> dict[str, Any]:
        return {"n_boot": self.n_boot, "level": self.ci_level, "seed": self.seed}


def prompt_batches(prompts: list[dict], traces: list[Trace], size: int) -> list[list[dict]]:
    """`prompts` grouped as `compose_batches` groups their traces: live runs decode the batches replay
    predicted."""
    by_id = {p["prompt_id"]: p for p in prompts}
    return [[by_id[t.prompt_id] for t in batch] for batch in compose_batches(traces, size)]


def compared(best: dict[int, int], batch: int, mlp) -> dict:
    """Controller factories of the policies run live at `batch`: none, its best fixed gamma, the MLP (`mlp`,
    a factory) and batch 1's best gamma where it is neither of the fixed ones."""
    policies = {NONE: lambda: FixedGamma(0), BEST: lambda: FixedGamma(best[batch]), MLP: mlp}
    if best[1] not in (0, best[batch]):
        policies[BEST_AT_1] = lambda: FixedGamma(best[1])
    return policies


def same_as(best: dict[int, int], batch: int) -> str:
    """The live policy whose runs stand for batch 1's best gamma at `batch` (itself when it ran)."""
    return NONE if best[1] == 0 else BEST if best[1] == best[batch] else BEST_AT_1


def batch_mlp(
    predictor: AcceptancePredictor, gamma_max: int, compression: str, costs, batch: int, exponent: float
):
    """A factory of the MLP controller whose stop rule optimises batch size `batch`'s cost table: the
    export's rule with that table in place of its batch-1 one (its discount and trim stay as tuned) and a
    row's share of the step `batch ** -exponent`."""
    table = costs.step_costs(batch)
    rule = copy.deepcopy(predictor.stop_rule)
    rule["step_ms"][compression] = [float(t) for t in table[: gamma_max + 1]]
    rule["draft_ms"][compression] = float(table.draft_ms)
    batched = copy.copy(predictor)
    batched.stop_rule = rule
    share = float(batch) ** -exponent
    return lambda: MLPController(batched, gamma_max, compression, name=MLP, share=share)


def choose_gammas(dev: list[Trace], test: list[Trace], costs: BatchCostModel, config: BatchConfig, mlp_for):
    """Per batch size: every fixed gamma's dev rate, the best one, the MLP's share exponent with the best
    dev rate (`mlp_for(batch, exponent)` builds it), and the test rates of the compared policies (and batch
    1's best gamma applied at that size); the rows of the replay table and each size's MLP factory."""
    step, cap = costs.step, config.max_new_tokens
    table, rows, best, mlps = {}, [], {}, {}
    for b in config.batch_sizes:
        dev_rates = {
            g: batch_goodput(lambda g=g: FixedGamma(g), dev, b, step, cap)
            for g in range(config.gamma_max + 1)
        }
        best[b] = max(dev_rates, key=lambda g: (dev_rates[g], -g))
        mlp_rates = {e: batch_goodput(mlp_for(b, e), dev, b, step, cap) for e in SHARE_EXPONENTS}
        exponent = max(SHARE_EXPONENTS, key=lambda e: (mlp_rates[e], -e))  # ties: the smaller exponent
        mlps[b] = mlp_for(b, exponent)
        table[b] = {
            "dev_rates": dev_rates,
            "best_gamma": best[b],
            "mlp_dev_rates": {str(e): r for e, r in mlp_rates.items()},
            "mlp_share_exponent": exponent,
        }
    for b in config.batch_sizes:
        table[b]["test_rates"], mine = test_rates(test, b, step, config, replayed(best, b, mlps[b]))
        rows += mine
    return best, table, rows, mlps


def replayed(best: dict[int, int], batch: int, mlp) -> dict:
    """The policies replayed on test prompts at `batch`: the compared ones and batch 1's best gamma."""
    return {**compared(best, batch, mlp), BEST_AT_1: lambda: FixedGamma(best[1])}


def test_rates(test: list[Trace], batch: int, step, config: BatchConfig, policies: dict):
    """Each policy's replayed decode tokens/s on the test traces in batches of `batch` under the clock
    `step`, and the rows of the replay table."""
    rates, rows = {}, []
    for name, factory in policies.items():
        tokens, ms = replay_totals(factory, test, batch, step, config.max_new_tokens)
        rates[name] = 1e3 * tokens / ms if ms > 0 else 0.0
        rows.append({"batch_size": batch, "policy": name, "tokens": tokens, "ms": ms})
    return rates, rows


def live_runs(
    pair,
    prompts: list[dict],
    traces: list[Trace],
    best: dict[int, int],
    config: BatchConfig,
    mlps,
    calibration: list[list[int]],
):
    """The test prompts, in the batches replay made of their `traces`, at every live batch size under the
    `compared` policies (`mlps[b]` the MLP's factory), their order rotated batch by batch: one row per
    (batch, policy); and the live runs' own clock: the batched calibration runs of the live batch sizes on
    `calibration` (dev prompts), cut into blocks that take turns with the live batches, fitted as the
    calibration is (so replay can be read in the machine's state of the live runs)."""
    import numpy as np
    from speckv.profiling.batch_costs import BatchTimer, calibration_runs
    from speckv.profiling.batch_decode import speculative_generate_batch
    from speckv.profiling.decode import DecodeConfig
    from speckv.profiling.models import eos_ids
    from tqdm import tqdm

    decode = DecodeConfig(
        max_new_tokens=config.max_new_tokens,
        gamma_max=config.gamma_max,
        eos_token_ids=eos_ids(pair.tokenizer, pair.target),
    )
    clock = BatchTimer(
        pair.target, pair.draft, pair.compression, calibration, config.gamma_max, config.calibration_tokens
    )
    rows = []
    plan = [
        (b, i, batch)
        for b in config.live_batch_sizes
        for i, batch in enumerate(prompt_batches(prompts, traces, b))
    ]
    runs = calibration_runs(len(calibration), config.live_batch_sizes, config.gamma_max)
    blocks = [[runs[j] for j in idx] for idx in np.array_split(np.arange(len(runs)), len(plan))]
    for k, (b, i, batch) in enumerate(tqdm(plan, desc=f"batched live {pair.compression}", unit="batch")):
        clock.time(blocks[k])
        policies = compared(best, b, mlps[b])
        names = list(policies)
        for name in names[k % len(names) :] + names[: k % len(names)]:
            controllers = [policies[name]() for _ in batch]
            ids = [p["input_ids"] for p in batch]
            result = speculative_generate_batch(
                pair.target, pair.draft, ids, controllers, decode, pair.compression
            )
            rows.append(
                {
                    "compression": pair.compression,
                    "batch_size": b,
                    "prompt_id": f"B{b}/{i}",
                    "policy": name,
                    "gamma": {BEST: best[b], BEST_AT_1: best[1], NONE: 0}.get(name),
                    "decode_tokens": result.decode_tokens,
                    "decode_s": result.decode_s,
                    "new_tokens": result.new_tokens,
                    "tokens": [r.token_ids for r in result.rows],
                }
            )
    return pd.DataFrame(rows), clock.model(config.live_batch_sizes)


def fidelity(live: pd.DataFrame, table: dict, best: dict[int, int], config: BatchConfig) -> dict:
    """Per live batch size and policy: measured decode tokens/s (summed over the batch) against replay's
    prediction for the same batches under the live runs' own clock (`table`'s live_clock_rates) and under
    the calibration every choice was made with (its test_rates, `tuning_model_*`), the ratios to `none` and
    to batch 1's best gamma with paired CIs over batches, and whether every row's tokens equal `none`'s."""
    out: dict[str, Any] = {}
    for b in config.live_batch_sizes:
        mine = live[live["batch_size"] == b]
        alone = mine[mine["policy"] == NONE]
        none_tokens = dict(zip(alone["prompt_id"], alone["tokens"], strict=True))
        at_1 = same_as(best, b)
        entry = {}
        for name in (NONE, BEST, MLP, BEST_AT_1):
            runs = mine[mine["policy"] == (at_1 if name == BEST_AT_1 else name)]
            measured = runs["decode_tokens"].sum() / runs["decode_s"].sum()
            predicted, tuning = table[b]["live_clock_rates"][name], table[b]["test_rates"][name]
            same = (t == none_tokens.get(p) for p, t in zip(runs["prompt_id"], runs["tokens"], strict=True))
            entry[name] = {
                "measured_tokens_per_s": float(measured),
                "replay_tokens_per_s": float(predicted),
                "replay_error": float(predicted / measured - 1.0),
                "tuning_model_tokens_per_s": float(tuning),
                "tuning_model_error": float(tuning / measured - 1.0),
                "lossless_batches": int(sum(same)),
                "batches": len(runs),
            }
            if name == BEST_AT_1:
                entry[name]["runs_of"] = at_1
            ran = runs["policy"].iloc[0]
            for key, base in (("vs_none", NONE), ("vs_batch_1_best", at_1)):
                if name != NONE and (name != BEST_AT_1 or key == "vs_none"):
                    ratio = paired_ratio(
                        mine, ran, base, time_col="decode_s", tokens_col="decode_tokens", **config.bootstrap
                    )
                    entry[name][key] = ratio.as_dict()
        out[str(b)] = entry
    return out


def trace_prompts(pair, prompts: list[dict], config: BatchConfig) -> list[Trace]:
    """Dense greedy traces of `prompts` with the pair's causal draft, as the profile stage computes them."""
    import pyarrow as pa
    from speckv.profiling.models import eos_ids
    from speckv.profiling.replay import traces_from_frame
    from speckv.profiling.traces import batched_traces

    runs = [
        {"prompt_id": p["prompt_id"], "task": p["task"], "split": p["split"], "compression": pair.compression}
        for p in prompts
    ]
    ids = [p["input_ids"] for p in prompts]
    eos = eos_ids(pair.tokenizer, pair.target)
    tables = batched_traces(pair.target, pair.draft, ids, config.gamma_max, config.max_new_tokens, eos, runs)
    return traces_from_frame(pa.concat_tables(tables).to_pandas())


def run_compression(config: BatchConfig, compression: str, predictor, dev: list[dict], test: list[dict]):
    """Everything for one compression: its summary section, batch cost model, live rows and replay rows."""
    from speckv.profiling.batch_costs import calibrate_batches
    from speckv.profiling.calibrate import calibration_prompts
    from speckv.profiling.models import draft_compression_for, load_pair

    pair = load_pair(
        config.target,
        config.draft,
        compression,
        cpu_kernels=config.cpu_kernels,
        draft_compression=draft_compression_for(config.draft_compression, compression),
    )
    traces = trace_prompts(pair, dev + test, config)
    dev_traces = [t for t in traces if t.split == "dev"]
    test_traces = [t for t in traces if t.split == "test"]
    calibration = calibration_prompts([p["input_ids"] for p in dev], config.calibration_prompts)
    costs, _ = calibrate_batches(
        pair.target,
        pair.draft,
        compression,
        calibration,
        config.batch_sizes,
        config.gamma_max,
        config.calibration_tokens,
    )
    mlp_for = lambda b, e: batch_mlp(predictor, config.gamma_max, compression, costs, b, e)  # noqa: E731
    best, table, replay_rows, mlps = choose_gammas(dev_traces, test_traces, costs, config, mlp_for)
    live, clock = live_runs(pair, test, test_traces, best, config, mlps, calibration)
    for b in config.live_batch_sizes:
        table[b]["live_clock_rates"], _ = test_rates(
            test_traces, b, clock.step, config, replayed(best, b, mlps[b])
        )
    section = {
        "best_gamma": {str(b): g for b, g in best.items()},
        "by_batch_size": {str(b): v for b, v in table.items()},
        "live": fidelity(live, table, best, config),
    }
    for key, error in (
        ("fidelity_max_abs_error", "replay_error"),
        ("tuning_model_max_abs_error", "tuning_model_error"),
    ):
        section[key] = max((abs(e[error]) for b in section["live"].values() for e in b.values()), default=0.0)
    return (
        section,
        (costs, clock),
        live.assign(tokens=live["tokens"].map(str)),
        pd.DataFrame(replay_rows).assign(compression=compression),
    )


def run_batch(config: BatchConfig) -> dict[str, Any]:
    """Gamma by batch size for every compression of `config`; writes its outputs under out_dir."""
    import json

    import torch
    from speckv.data.prompts import load_prompt_file
    from speckv.predictor.controller import shared_export
    from speckv.predictor.evaluation.schedule import transformers_settings, vllm_fragment
    from speckv.profiling.atomic import atomic_path, write_text
    from speckv.profiling.cpu import cpu_info

    torch.set_num_threads(config.threads)
    dev = load_prompt_file(Path(config.prompts), splits=["dev"], per_task=config.dev_per_task)
    test = load_prompt_file(Path(config.prompts), splits=["test"], per_task=config.test_per_task)
    if len(dev) < max(config.batch_sizes) or len(test) < max(config.live_batch_sizes):
        raise SpeckvError(
            f"{config.prompts} gives {len(dev)} dev and {len(test)} test prompts: batch sizes up to "
            f"{max(config.batch_sizes)} need as many dev prompts (dev_per_task), live batches up to "
            f"{max(config.live_batch_sizes)} as many test prompts (test_per_task)"
        )
    predictor = shared_export(config.export_dir)
    out = Path(config.out_dir)
    summary: dict[str, Any] = {"config": asdict(config), "cpu": cpu_info(), "compressions": {}}
    results = {}
    for compression in config.compressions:
        section, *results[compression] = run_compression(config, compression, predictor, dev, test)
        summary["compressions"][compression] = section
    schedule: dict[str, Any] = {
        "measured_with": f"SpecKV's batched loop on {summary['cpu']['model']} ({summary['cpu']['capability']}), "
        f"{config.threads} threads: not measured on vLLM",
        "compressions": {},
    }
    for compression, section in summary["compressions"].items():
        best = {int(b): g for b, g in section["best_gamma"].items()}
        schedule["compressions"][compression] = {
            "best_gamma_by_batch_size": section["best_gamma"],
            "vllm_speculative_config": vllm_fragment(best),
            "transformers_generation": transformers_settings(best[1], None),
        }
    out.mkdir(parents=True, exist_ok=True)
    lives, replays = [], []
    for compression, ((costs, clock), live, replay_rows) in results.items():
        costs.save(out / f"{compression}_batch.json")
        clock.save(out / f"{compression}_batch_live_clock.json")
        lives.append(live)
        replays.append(replay_rows)
    with atomic_path(out / "live.parquet") as tmp:
        pd.concat(lives).to_parquet(tmp, index=False)
    with atomic_path(out / "replay.parquet") as tmp:
        pd.concat(replays).to_parquet(tmp, index=False)
    write_text(out / "speculation_schedule.json", json.dumps(schedule, indent=2) + "\n")
    write_text(out / "summary.json", json.dumps(summary, indent=2, default=float) + "\n")
    return summary
