"""Distil the default draft from the default target's own behaviour on the distill-split prompts.

Recipe ("shallow copy", chosen because it reuses the target's output space exactly):
1. Teacher data: the target's greedy responses to the distill prompts (batched, left padded); tasks with fewer
   prompts than `sequences_per_task` also get sampled responses to the same prompts (temperature
   `sample_temperature`) until they have that many sequences; a prompt's rows share one prefill
   (`data/teacher.py`). The target's final hidden state at every prompt and response position is kept;
   all is cached in one file. Generation runs the target in `teacher_dtype` (bfloat16: ~1.8x the tokens
   per second of float32 on a CPU with native bf16; its argmax matches float32's on 98.2% of teacher-forced dev
   positions); dev/test sequences, on which agreement is measured, are always the float32 target's greedy
   responses.
2. Draft: a 2-layer Llama initialised from the target's first 2 layers, sharing the target's (tied) embedding
   and head, both frozen. Only the layers and final norm train, so the saved model has the full-vocab head.
3. Loss: on response positions, KL from the target's distribution restricted to its most frequent tokens
   (logits = hidden @ E_r^T, exact because the head is shared) + cross-entropy on the target's own argmax
   there (agreement is a top-1 metric); at all positions, w·(1 − cosine) between draft and target final
   hidden. Training runs under bfloat16 autocast (`train_autocast`; ~1.5x the steps per second here).
4. Held-out agreement: the draft's full-vocab argmax against the target's greedy tokens on dev prompts (the
   recipe was chosen on them) and on test prompts (reported). The teacher prompts come from the `distill`
   split, which the acceptance predictor never sees: a draft recites the responses it was trained on.

Why this loss and lr (250-step trials on the cached teacher data, dev agreement): KL + 4·cos at lr 5e-4
0.255; adding CE and cos weight 1 at lr 1.5e-3 0.282, 3e-3 0.302, 6e-3 0.303; a third layer at 1.5e-3
0.294 for ~30% more time per step and per drafted token. At lr 3e-3 (250 steps):
KL + CE on prompt positions too, with the target's own argmax as the CE label there, at weight 0 .302,
0.5 .315, 1.0 .313 (a step costs ~30% more); a second layer copied from the target's *last* layer instead
of layer 1: .272. Overfitting limits the recipe (a few epochs of ~35k response tokens), so the default
also takes longer responses (128 tokens) as data. On that data (250 steps): untying the input embedding
and training it (head kept) .297 against .294, for 20% more time per step: not taken.
Data per minute: bf16 autocast against float32 training, 250 steps on the same data, dev .2996 vs .2999 at
~1.5x the steps/s; bf16 teacher generation plus sampled repeats gave 72k response tokens in 9.6 min (float32
greedy: 38.6k in ~7.5-8.5 min), and 1000 steps on them test .355 / dev .345 (seed 0), test .356 / dev .354
(seed 1, same data) against .326 / .336 on the float32 greedy data.

The stage's parts: teacher data in `data/teacher.py`, the loss in `data/distill_loss.py`, the draft and its
training loop in `data/draft_training.py`, held-out agreement and the model card in `data/model_card.py`;
this module holds the config and runs them in order (`distill`).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from speckv.data.distill_loss import teacher_targets
from speckv.data.draft_training import build_draft, pick_vocab, train_draft
from speckv.data.model_card import agreement_by_task, model_card
from speckv.data.models import building, publish_model
from speckv.data.prompts import load_prompt_file
from speckv.data.teacher import (
    generate_teacher_data,
    load_or_generate_teacher,
    load_or_generate_teachers,
    plan_teacher_rows,
)
from speckv.profiling.cpu import cpu_info, resolve_auto_dtype
from speckv.profiling.errors import SpeckvError

# The parts are re-exported here for callers that import them from this module; patch a function in the
# module that defines it (e.g. `speckv.data.teacher.generate_teacher_data`), where its callers look it up.
__all__ = [
    "DistillConfig",
    "agreement_by_task",
    "build_draft",
    "distill",
    "generate_teacher_data",
    "no_bf16_applied",
    "plan_teacher_rows",
    "teacher_targets",
    "train_draft",
]

log = logging.getLogger(__name__)


@dataclass
class DistillConfig:
    """The `distill:` section of params.yaml."""

    seed: int = 0  # seeds prompt order, initialisation and batching
    draft_layers: int = 2  # decoder layers, copied from the target's first layers
    sequences_per_task: int = 150  # teacher sequences per task: greedy per prompt, then sampled repeats
    sample_temperature: float = 0.8  # temperature of the sampled repeats for tasks with few prompts
    teacher_dtype: str = "auto"  # teacher target dtype; auto: bf16 on native-bf16 CPUs (dev/test: float32)
    dev_per_task: int = 10  # dev prompts per task for held-out agreement (recipe choices were made on it)
    test_per_task: int = 10  # test prompts per task for the reported agreement (never used for a choice)
    max_new_tokens: int = 128  # target response length cap for teacher data
    gen_batch_size: int = 48  # rows per batched teacher generation (a prompt's rows share its prefill)
    restricted_vocab: int = 8192  # most frequent target tokens the training loss is computed on
    steps: int = 1000  # optimizer steps
    batch_tokens: int = 1024  # token positions per optimizer step (whole sequences, right padded)
    lr: float = 3e-3  # AdamW peak learning rate (warmup then cosine decay)
    warmup_steps: int = 30  # linear warmup before cosine decay
    cosine_weight: float = 1.0  # weight of 1 − cos(draft hidden, target hidden)
    ce_weight: float = 1.0  # weight of cross-entropy on the target's greedy token (agreement is top-1)
    prompt_weight: float = 0.5  # cosine-loss weight of prompt positions
    prompt_head_weight: float = 0.5  # KL + CE weight of prompt positions (0: responses only)
    train_autocast: str = "auto"  # training autocast; auto: bf16 on native-bf16 CPUs; "float32": off
    save_dtype: str = "float16"  # halves the head's memory traffic: 1-token forward ~15 -> ~9 ms on this CPU
    threads: int = 2  # torch CPU threads; use 1 when other jobs share the cores (2 then ran 10x slower)
    feature_steps: int = (
        2000  # AdamW steps of the feature draft (data/feature_distill.py), same data and schedule
    )
    feature_noise: float = 0.0  # uniform noise on the feature draft's input features (x their RMS)
    feature_init_layer: int = 0  # target layer the feature draft's one layer is initialised from
    # Replacements for the settings above on a CPU without native bf16, where float32 costs ~2x the time of
    # everything (applied only while teacher_dtype and train_autocast are both `auto`): see `resolve_config`.
    no_bf16: dict[str, int] = field(default_factory=dict)


def save_dtype(name: str, what: str = "save_dtype") -> torch.dtype:
    if name not in ("float32", "float16", "bfloat16"):
        raise SpeckvError(f"{what} must be float32, float16 or bfloat16, got {name!r}")
    return getattr(torch, name)


# Settings `no_bf16` may replace: the amounts of work, not the recipe's form.
NO_BF16_KEYS = ("sequences_per_task", "max_new_tokens", "steps", "feature_steps", "batch_tokens")


def resolve_config(config: DistillConfig) -> DistillConfig:
    """`auto` dtypes resolved for this CPU (profiling.cpu), so the cache key and model card say what ran.

    Where both dtypes are `auto` and the CPU has no native bf16, the `no_bf16` replacements apply too (and
    are then emptied, so a resolved config says what ran): float32 generation and training take about twice
    bf16's time, so on such CPUs the stage does less work.
    """
    bad = sorted(set(config.no_bf16) - set(NO_BF16_KEYS))
    if bad:
        raise SpeckvError(f"no_bf16 may set only {list(NO_BF16_KEYS)}, got {bad}")
    resolved = replace(
        config,
        teacher_dtype=resolve_auto_dtype(config.teacher_dtype),
        train_autocast=resolve_auto_dtype(config.train_autocast),
        no_bf16={},
    )
    applied = no_bf16_applied(config)
    return replace(resolved, **{k: int(v) for k, v in applied.items()}) if applied else resolved


def no_bf16_applied(config: DistillConfig) -> dict[str, int]:
    """The `no_bf16` replacements that apply on this CPU (none where it has native bf16 or a dtype is set)."""
    auto = config.teacher_dtype == "auto" and config.train_autocast == "auto"
    return dict(config.no_bf16) if auto and resolve_auto_dtype("auto") == "float32" else {}


def check_config(config: DistillConfig) -> None:
    """Reject settings that would only fail (or silently misbehave) minutes into the run."""
    config = resolve_config(config)
    if config.batch_tokens < 1 or config.gen_batch_size < 1:
        raise SpeckvError("batch_tokens and gen_batch_size must be positive")
    save_dtype(config.save_dtype)
    save_dtype(config.teacher_dtype, "teacher_dtype")
    if config.train_autocast not in ("float32", "bfloat16"):
        raise SpeckvError(f"train_autocast must be float32 or bfloat16, got {config.train_autocast!r}")
    if config.sequences_per_task < 1 or config.steps < 1 or config.max_new_tokens < 1:
        raise SpeckvError("sequences_per_task, steps and max_new_tokens must be positive")
    if config.feature_steps < 1 or config.feature_noise < 0:
        raise SpeckvError("feature_steps must be >= 1 and feature_noise >= 0")
    if not config.sample_temperature > 0:
        raise SpeckvError(f"sample_temperature must be positive, got {config.sample_temperature}")


def set_seed(seed: int) -> None:
    torch.manual_seed(seed)


@dataclass
class TeacherSplits:
    """Teacher sequences: `train` from the distill prompts (target in teacher_dtype), `dev`/`test` the float32
    target's greedy responses; seconds spent on train and on all three (cached sequences cost none)."""

    train: list[dict[str, Any]]
    dev: list[dict[str, Any]]
    test: list[dict[str, Any]]
    train_s: float
    total_s: float


def teacher_splits(
    target_dir: Path,
    target: Any,
    tokenizer: Any,
    prompt_path: Path,
    teacher_path: Path,
    config: DistillConfig,
) -> TeacherSplits:
    """The teacher data both drafts train and are measured on, cached at `teacher_path` (train) and beside it
    (`-dev`, `-test`); `target` is the float32 target, `config` already resolved and checked."""
    from transformers import AutoModelForCausalLM

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    train_rows = plan_teacher_rows(
        load_prompt_file(prompt_path, splits=["distill"]), config.sequences_per_task
    )
    dev_rows = load_prompt_file(prompt_path, splits=["dev"], per_task=config.dev_per_task)
    test_rows = load_prompt_file(prompt_path, splits=["test"], per_task=config.test_per_task)
    if not train_rows or not dev_rows or not test_rows:
        raise SpeckvError(f"{prompt_path} lacks distill, dev or test prompts")
    t0 = time.perf_counter()
    teacher = target
    if config.teacher_dtype != "float32":
        teacher = AutoModelForCausalLM.from_pretrained(
            target_dir, dtype=save_dtype(config.teacher_dtype, "teacher_dtype")
        ).eval()
    train = load_or_generate_teacher(teacher_path, teacher, train_rows, config, pad_id, eos)
    del teacher
    train_s = time.perf_counter() - t0
    stem, suffix = teacher_path.stem, teacher_path.suffix
    dev, test = load_or_generate_teachers(
        [
            (teacher_path.with_name(f"{stem}-dev{suffix}"), dev_rows),
            (teacher_path.with_name(f"{stem}-test{suffix}"), test_rows),
        ],
        target,
        config,
        pad_id,
        eos,
    )
    return TeacherSplits(train, dev, test, train_s, time.perf_counter() - t0)


def distill(
    target_dir: Path, prompt_path: Path, out_dir: Path, teacher_path: Path, config: DistillConfig
) -> dict[str, Any]:
    """Distil a draft from the target in `target_dir`, write it to `out_dir` atomically, return metrics."""
    from speckv.profiling.calibrate import forward_ms
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_config(config)
    applied = no_bf16_applied(config)
    config = resolve_config(config)
    torch.set_num_threads(config.threads)
    set_seed(config.seed)
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    teacher = teacher_splits(target_dir, target, tokenizer, prompt_path, teacher_path, config)
    train_seqs, dev_seqs, test_seqs = teacher.train, teacher.dev, teacher.test
    teacher_train_s, teacher_s = teacher.train_s, teacher.total_s
    n_sampled = sum(s.get("sample", 0) > 0 for s in train_seqs)

    vocab_ids = pick_vocab(train_seqs, config.restricted_vocab, target.config.vocab_size)
    vocab_set = set(vocab_ids.tolist())
    response_tokens = [t for s in train_seqs for t in s["tokens"][s["n_prompt"] :].tolist()]
    set_seed(config.seed)
    draft = build_draft(target, config.draft_layers)
    train_stats = train_draft(draft, train_seqs, vocab_ids, config)

    out_dir = Path(out_dir)
    with building(out_dir, ".distill-") as build_dir:
        draft.to(save_dtype(config.save_dtype)).save_pretrained(build_dir)
        tokenizer.save_pretrained(build_dir)
        # Measure the saved artefact, loaded as users load it; 1-token forwards after a real dev context.
        saved = AutoModelForCausalLM.from_pretrained(build_dir, dtype="auto").eval()
        timing_context = dev_seqs[0]["tokens"][:64].tolist()
        with torch.inference_mode():
            draft_ms = forward_ms(saved, timing_context, 1, repeats=40, warmup=3)
            target_ms = forward_ms(target, timing_context, 1, repeats=40, warmup=3)
        metrics = {
            "agreement": agreement_by_task(saved, dev_seqs),
            "agreement_test": agreement_by_task(saved, test_seqs),
            "n_train_prompts": len(train_seqs) - n_sampled,
            "n_train_sequences": len(train_seqs),
            "n_train_sampled": n_sampled,
            "train_sequences_per_task": dict(Counter(s["task"] for s in train_seqs)),
            "n_dev_prompts": len(dev_seqs),
            "n_test_prompts": len(test_seqs),
            "n_train_response_tokens": len(response_tokens),
            "n_train_prompt_tokens": sum(s["n_prompt"] for s in train_seqs if s.get("sample", 0) == 0),
            "vocab_coverage": sum(t in vocab_set for t in response_tokens) / max(1, len(response_tokens)),
            "teacher_s": teacher_s,
            "teacher_train_s": teacher_train_s,
            **train_stats,
            "draft_forward_ms": draft_ms,
            "target_forward_ms": target_ms,
            "cpu": cpu_info(),
            "no_bf16_applied": applied,
            "config": asdict(config),
        }
        marker = {"target": str(target_dir), "config": asdict(config)}
        publish_model(build_dir, out_dir, metrics, model_card(config, metrics), marker)
    log.info(
        "draft written to %s: agreement test %.3f %s, dev %.3f",
        out_dir,
        metrics["agreement_test"]["overall"],
        {t: round(a, 3) for t, a in metrics["agreement_test"]["per_task"].items()},
        metrics["agreement"]["overall"],
    )
    return metrics
