"""Distil a feature-conditioned (EAGLE-style) draft for the default target: `speckv models distill-features`.

Same teacher cache, prompts, restricted vocabulary, loss, optimiser and schedule as the standalone draft
(`data/distill.py`, section `distill:` of params.yaml), so the two are compared on equal data; the draft is
one decoder layer initialised from the target's first layer (250-step trials, dev first-token agreement:
layer 0 .297, random .272, last layer .219), trained for `feature_steps` (1000: dev .381; 2000: dev .401,
test .423). Measured on the saved artefact: first-token
agreement on dev and test prompts (the draft given x_t and the target's f_{t-1}, against the target's greedy
x_{t+1}), and one drafted token's cost as the decode loop drafts it against the target's 1-token forward.
The distill stage builds it after the standalone draft; it is the `default` draft, the standalone one is
`default-standalone` (transformers' assisted generation can run only a standalone draft).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from speckv.data.distill import (
    DistillConfig,
    check_config,
    no_bf16_applied,
    resolve_config,
    save_dtype,
    set_seed,
    teacher_splits,
)
from speckv.data.draft_training import pick_vocab
from speckv.data.feature_draft_training import (
    build_feature_draft,
    feature_agreement_by_task,
    train_feature_draft,
)
from speckv.data.model_card import no_bf16_note
from speckv.data.models import building, publish_model
from speckv.profiling.cpu import cpu_info
from speckv.profiling.errors import SpeckvError

__all__ = ["distill_features"]

log = logging.getLogger(__name__)


def distill_features(
    target_dir: Path,
    prompt_path: Path,
    out_dir: Path,
    teacher_path: Path,
    config: DistillConfig,
) -> dict[str, Any]:
    """Train a feature draft for the target in `target_dir`, write it to `out_dir` atomically, return metrics."""
    from speckv.profiling.calibrate import draft_ms_per_token, forward_ms
    from speckv.profiling.feature_draft import load_feature_draft
    from transformers import AutoModelForCausalLM

    check_config(config)
    applied = no_bf16_applied(config)
    config = resolve_config(config)
    steps, feature_noise, init_layer = config.feature_steps, config.feature_noise, config.feature_init_layer
    torch.set_num_threads(config.threads)
    target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    if not -target.config.num_hidden_layers <= init_layer < target.config.num_hidden_layers:
        raise SpeckvError(
            f"init layer {init_layer} is outside the target's {target.config.num_hidden_layers} layers"
        )
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    teacher = teacher_splits(target_dir, target, tokenizer, prompt_path, teacher_path, config)
    seqs, dev, test = teacher.train, teacher.dev, teacher.test

    set_seed(config.seed)
    vocab_ids = pick_vocab(seqs, config.restricted_vocab, target.config.vocab_size)
    draft = build_feature_draft(target, vocab_ids, init_layer, str(target_dir))
    stats = train_feature_draft(draft, seqs, config, steps, feature_noise)

    out_dir = Path(out_dir)
    with building(out_dir, ".distill-features-") as build_dir:
        draft.to(save_dtype(config.save_dtype)).save(build_dir)
        tokenizer.save_pretrained(build_dir)
        saved = load_feature_draft(build_dir, torch.device("cpu"))
        exact = load_feature_draft(build_dir, torch.device("cpu")).float()  # half weights, exactly, in fp32
        context = dev[0]["tokens"][:64].tolist()
        with torch.inference_mode():
            draft_ms = draft_ms_per_token(saved, context, repeats=40, warmup=3)
            target_ms = forward_ms(target, context, 1, repeats=40, warmup=3)
        metrics = {
            "kind": "feature",
            "agreement": feature_agreement_by_task(exact, dev),
            "agreement_test": feature_agreement_by_task(exact, test),
            "n_train_sequences": len(seqs),
            "steps": steps,
            "feature_noise": feature_noise,
            "init_layer": init_layer,
            **stats,
            "draft_token_ms": draft_ms,
            "target_forward_ms": target_ms,
            "cost_ratio": draft_ms / target_ms,
            "cpu": cpu_info(),
            "no_bf16_applied": applied,
            "config": asdict(config),
        }
        marker = {"target": str(target_dir), "kind": "feature", "steps": steps}
        publish_model(build_dir, out_dir, metrics, _card(metrics), marker)
    log.info(
        "feature draft written to %s: first-token agreement test %.3f, dev %.3f; %.2f ms per token (%.3f of the target's)",
        out_dir,
        metrics["agreement_test"]["overall"],
        metrics["agreement"]["overall"],
        draft_ms,
        metrics["cost_ratio"],
    )
    return metrics


def _card(m: dict[str, Any]) -> str:
    dev, test = m["agreement"], m["agreement_test"]
    rows = "\n".join(
        f"| {t} | {test['per_task'].get(t, float('nan')):.3f} | {a:.3f} |" for t, a in dev["per_task"].items()
    )
    started = time.strftime("%Y-%m-%d")
    note = no_bf16_note(m)
    no_bf16 = f"\n\n{note}" if note else ""
    return f"""# SpecKV feature draft (EAGLE-style) for SmolLM2-135M-Instruct

One decoder layer that reads the target's final hidden state (`profiling/feature_draft.py`), built by
`speckv models distill-features` on {started} from the distill stage's teacher cache: {m["steps"]} steps, layer
initialised from the target's layer {m["init_layer"]}, feature noise {m["feature_noise"]}.

## Measured (CPU: {m["cpu"]["model"]}, {m["cpu"]["capability"]}; timings are noisy)
First-token agreement with the target's greedy tokens: **{test["overall"]:.3f}** test, {dev["overall"]:.3f} dev.

| task | test | dev |
| --- | --- | --- |
{rows}

One drafted token {m["draft_token_ms"]:.2f} ms against the target's 1-token forward {m["target_forward_ms"]:.1f} ms
(ratio {m["cost_ratio"]:.3f}); training {m["train_s"]:.0f} s.{no_bf16}
"""
