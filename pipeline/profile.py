"""`speckv calibrate` and `speckv profile`: the measured cost model and the profiling tables."""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict, replace
from pathlib import Path

import torch
from speckv.pipeline.config import load_section, stage_parser
from speckv.profiling.costmodel import CostModel
from speckv.profiling.errors import SpeckvError
from speckv.profiling.models import draft_compression_for, eos_ids, load_pair
from speckv.profiling.stage_config import (
    EXECUTORS,
    CalibrateConfig,
    ProfileConfig,
    select_compressions,
)

log = logging.getLogger(__name__)


def register(sub) -> None:
    summary = "fit the decode loop's step costs per compression: every fixed gamma on dev prompts"
    p = stage_parser(sub, "calibrate", summary, "section `calibrate:`", run_calibrate)
    p.add_argument("--compression", help="only this compression (default: all in params)")
    summary = "run prompts x controllers with the recorder on; write Parquet tables"
    p = stage_parser(sub, "profile", summary, "section `profile:`", run_profile_cmd)
    p.add_argument("--compression", help="only this compression (default: all in params)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--executor", choices=EXECUTORS, help="override profile.executor (local | ray)")
    p.add_argument("--ray-address", help="override profile.ray_address: an existing Ray cluster, e.g. auto")


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
    compressions = select_compressions(cfg.compressions, args.compression)
    torch.set_num_threads(cfg.threads)
    cfg.validate()
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
    from speckv.data.prompts import load_prompt_file
    from speckv.profiling.profile import run_meta, run_profile

    cfg = load_section(ProfileConfig, "profile", args.params, args.pair)
    compressions = select_compressions(cfg.compressions, args.compression)
    cfg = replace(
        cfg,
        executor=args.executor or cfg.executor,
        ray_address=args.ray_address or cfg.ray_address,
    )
    cfg.validate()
    decode = cfg.decode_config()
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
        meta = run_meta(cfg, pair, draft_compression)
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
