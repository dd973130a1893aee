"""`speckv calibrate` and `speckv profile`: the measured cost model and the profiling tables."""

from __future__ import annotations

import argparse
import json
import logging
import platform
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from speckv.pipeline.config import add_params_arguments, load_section
from speckv.profiling.costmodel import CostModel
from speckv.profiling.decode import DecodeConfig
from speckv.profiling.errors import SpeckvError
from speckv.profiling.models import (
    COMPRESSIONS,
    draft_compression_for,
    eos_ids,
    load_pair,
    model_fingerprint,
)

log = logging.getLogger(__name__)


@dataclass
class CalibrateConfig:
    target: str = "default"  # target model reference
    draft: str = "default"  # draft model reference
    draft_compression: str | None = None  # null: the draft's own dtype; same: the target's; or a compression
    compressions: list[str] = field(default_factory=lambda: ["fp32", "int8", "nf4"])
    gamma_max: int = 8  # verify costs are measured for 1..gamma_max+1 tokens
    prompts: str = "artifacts/prompts/prompts.jsonl"  # dev prompts: the calibration runs' contexts
    loop_prompts: int = 6  # dev prompts, spread over the prompt lengths, each decoded at every fixed gamma
    max_new_tokens: int = 32  # tokens per calibration run
    repeats: int = 15  # timed repeats of the isolated forwards kept beside the model (median)
    warmup: int = 3  # untimed repeats first
    out_dir: str = "artifacts/calibrate"  # {compression}.json and cost_model.png
    threads: int = 2  # torch CPU threads
    cpu_kernels: bool = (
        True  # few-row fp32 kernels (profiling/kernels.py), float32 int8/nf4 weights (quant_kernels.py)
    )
    device: str | None = None  # null: CUDA when present, else CPU


@dataclass
class ProfileConfig:
    target: str = "default"  # target model reference
    draft: str = "default"  # draft model reference
    draft_compression: str | None = None  # null: the draft's own dtype; same: the target's; or a compression
    compressions: list[str] = field(default_factory=lambda: ["fp32", "int8", "nf4"])  # one run each
    prompts: str = "artifacts/prompts/prompts.jsonl"  # tokenized prompt file with splits
    per_task: dict = field(
        default_factory=lambda: {"train": 2}
    )  # prompts per task and split run through the decode loop with the recorder on (timings, sampling, paper)
    controllers: list[str] = field(default_factory=lambda: ["fixed:8"])  # full drafts label every position
    gamma_max: int = 8  # most tokens drafted per step
    max_new_tokens: int = 48  # generated tokens per prompt
    temperature: float = 0.0  # 0 is greedy; > 0 records sampling runs with acceptance probabilities
    top_k: int = 0  # sampling only; 0 keeps all tokens
    top_p: float = 1.0  # sampling only
    seed: int = 0  # sampling generator seed
    trace_per_task: dict = field(
        default_factory=lambda: {"train": 20, "dev": 10, "test": 10}
    )  # prompts per task and split with a dense greedy trace (the predictor's rows, replay, the oracle)
    trace_batch: int = 48  # target continuations decoded together when tracing
    executor: str = (
        "local"  # local: jobs one after another here; ray: each job a Ray task (profiling/ray_executor.py)
    )
    ray_address: str | None = (
        None  # null: start a local Ray instance sized to this machine; else a cluster address
    )
    ray_threads: int = 1  # CPUs (torch threads) each Ray task declares and uses
    out_dir: str = "artifacts/profile"  # tokens/, steps/, traces/ (hive: compression=/task=)
    threads: int = 2  # torch CPU threads
    cpu_kernels: bool = (
        True  # few-row fp32 kernels (profiling/kernels.py), float32 int8/nf4 weights (quant_kernels.py)
    )
    device: str | None = None  # null: CUDA when present, else CPU


def _check_compressions(compressions: list[str]) -> None:
    bad = [c for c in compressions if c not in COMPRESSIONS]
    if bad:
        raise SpeckvError(f"unknown compression(s) {bad}; expected some of {', '.join(COMPRESSIONS)}")


def _select(cfg_compressions: list[str], requested: str | None) -> list[str]:
    chosen = [requested] if requested else cfg_compressions
    _check_compressions(chosen)
    return chosen


def register(sub) -> None:
    p = sub.add_parser(
        "calibrate", help="fit the decode loop's step costs per compression: every fixed gamma on dev prompts"
    )
    add_params_arguments(p, "section `calibrate:`")
    p.add_argument("--compression", help="only this compression (default: all in params)")
    p.set_defaults(func=run_calibrate)
    p = sub.add_parser("profile", help="run prompts x controllers with the recorder on; write Parquet tables")
    add_params_arguments(p, "section `profile:`")
    p.add_argument("--compression", help="only this compression (default: all in params)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--executor", choices=EXECUTORS, help="override profile.executor (local | ray)")
    p.add_argument("--ray-address", help="override profile.ray_address: an existing Ray cluster, e.g. auto")
    p.set_defaults(func=run_profile_cmd)


EXECUTORS = ("local", "ray")


def make_executor(cfg: ProfileConfig, compression: str, device: torch.device):
    """None (run_profile's local executor) or a RayExecutor whose tasks load the same pair."""
    if cfg.executor == "local":
        return None
    from speckv.profiling.ray_executor import PairSpec, RayExecutor

    spec = PairSpec(
        cfg.target,
        cfg.draft,
        compression,
        cfg.device,
        cfg.cpu_kernels,
        cfg.ray_threads,
        draft_compression_for(cfg.draft_compression, compression),
    )
    return RayExecutor(spec, cfg.ray_address, gpus_per_task=1.0 if device.type == "cuda" else 0.0)


def run_calibrate(args: argparse.Namespace) -> int:
    from speckv.data.prompts import load_prompt_file
    from speckv.profiling.atomic import atomic_path
    from speckv.profiling.calibrate import calibrate, calibration_prompts
    from speckv.profiling.costmodel import plot_cost_models

    cfg = load_section(CalibrateConfig, "calibrate", args.params, args.pair)
    compressions = _select(cfg.compressions, args.compression)
    torch.set_num_threads(cfg.threads)
    if cfg.loop_prompts < 1 or cfg.max_new_tokens < 2:
        raise SpeckvError("calibrate.loop_prompts must be >= 1 and calibrate.max_new_tokens >= 2")
    rows = load_prompt_file(cfg.prompts, splits=["dev"])
    if not rows:
        raise SpeckvError(f"{cfg.prompts} holds no dev prompt to calibrate with")
    prompts = calibration_prompts([r["input_ids"] for r in rows], cfg.loop_prompts)
    out = Path(cfg.out_dir)
    for compression in compressions:
        draft_compression = draft_compression_for(cfg.draft_compression, compression)
        pair = load_pair(cfg.target, cfg.draft, compression, cfg.device, cfg.cpu_kernels, draft_compression)
        model, steps = calibrate(
            pair.target,
            pair.draft,
            compression,
            prompts,
            cfg.gamma_max,
            cfg.max_new_tokens,
            cfg.repeats,
            cfg.warmup,
        )
        model.meta["config"] = asdict(cfg)
        with atomic_path(out / f"{compression}_steps.parquet") as tmp:
            steps.to_parquet(tmp, index=False)
        model.save(out / f"{compression}.json")
        log.info(
            "%s at %.0f context tokens: step ms %s (+%s ms per context token), draft %.2f ms/token",
            compression,
            model.context_tokens,
            [round(v, 1) for v in model.step_ms],
            [round(v, 3) for v in model.step_ms_per_token],
            model.draft_ms,
        )
        del pair
    models = [CostModel.load(p) for p in sorted(out.glob("*.json"))]
    plot_cost_models(models, out / "cost_model.png")
    return 0


def run_profile_cmd(args: argparse.Namespace) -> int:
    import transformers
    from speckv.data.prompts import load_prompt_file
    from speckv.profiling.profile import run_profile

    cfg = load_section(ProfileConfig, "profile", args.params, args.pair)
    compressions = _select(cfg.compressions, args.compression)
    for name in ("per_task", "trace_per_task"):
        if not set(getattr(cfg, name)) <= {"train", "dev", "test"}:
            raise SpeckvError(f"profile.{name} keys must be train/dev/test, got {sorted(getattr(cfg, name))}")
    if cfg.trace_batch < 1:
        raise SpeckvError(f"profile.trace_batch must be >= 1, got {cfg.trace_batch}")
    cfg = replace(
        cfg,
        executor=args.executor or cfg.executor,
        ray_address=args.ray_address or cfg.ray_address,
    )
    if cfg.executor not in EXECUTORS:
        raise SpeckvError(f"profile.executor must be one of {', '.join(EXECUTORS)}, got {cfg.executor!r}")
    if cfg.ray_threads < 1:
        raise SpeckvError(f"profile.ray_threads must be >= 1, got {cfg.ray_threads}")
    decode = DecodeConfig(
        max_new_tokens=cfg.max_new_tokens,
        gamma_max=cfg.gamma_max,
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
        seed=cfg.seed,
    )
    decode.validate()
    prompts, trace_prompts = [], []
    for split, n in cfg.per_task.items():
        prompts += load_prompt_file(cfg.prompts, splits=[split], per_task=int(n)) if n else []
    for split, n in cfg.trace_per_task.items():
        trace_prompts += load_prompt_file(cfg.prompts, splits=[split], per_task=int(n)) if n else []
    if not prompts and not trace_prompts:
        raise SpeckvError(
            "no prompts selected: check profile.per_task, profile.trace_per_task and the prompt file"
        )
    torch.set_num_threads(cfg.threads)
    for compression in compressions:
        draft_compression = draft_compression_for(cfg.draft_compression, compression)
        pair = load_pair(cfg.target, cfg.draft, compression, cfg.device, cfg.cpu_kernels, draft_compression)
        decode_c = replace(decode, eos_token_ids=eos_ids(pair.tokenizer, pair.target))
        meta = {
            "target": model_fingerprint(cfg.target, "target"),
            "draft": model_fingerprint(cfg.draft, "draft"),
            "compression": compression,
            **({"draft_compression": draft_compression} if draft_compression else {}),
            "device": str(pair.device),
            # what shapes the rows beyond the models: a change here makes earlier part files stale
            "attention": pair.target.config._attn_implementation,
            "cpu_kernels": cfg.cpu_kernels,
            # the kernels' memory plan changes a summation order or two; "full" (the usual) is left out so
            # earlier part files stay valid
            **({"kernel_plan": pair.kernels} if pair.kernels in ("lean", "off") else {}),
            "versions": {
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "python": platform.python_version(),
            },
            "prompts": cfg.prompts,
            "seed": cfg.seed,
        }
        counts = run_profile(
            pair,
            prompts,
            cfg.controllers,
            decode_c,
            Path(cfg.out_dir),
            trace_prompts,
            meta,
            progress=not args.no_progress,
            trace_batch=cfg.trace_batch,
            executor=make_executor(cfg, compression, pair.device),
        )
        log.info("%s: %s", compression, json.dumps(counts))
        del pair
    return 0
