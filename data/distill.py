"""Distil the default draft from the default target's own behaviour on the distill-split prompts.

Recipe ("shallow copy", chosen because it reuses the target's output space exactly):
1. Teacher data: the target's greedy responses to the distill prompts (batched, left padded); tasks with fewer
   prompts than `sequences_per_task` also get sampled responses to the same prompts (temperature
   `sample_temperature`) until they have that many sequences. A hook on the final norm records the target's
   final hidden state at every prompt and response position; all is cached in one file. Generation runs the
   target in `teacher_dtype` (bfloat16: ~1.8x the tokens per second of float32 on this CPU; its argmax
   matches float32's on 98.2% of teacher-forced dev positions); dev/test sequences, on which agreement is
   measured, are always the float32 target's greedy responses.
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
0.294 for ~30% more time per step and per drafted token. Second round (session 2, same 250 steps, lr 3e-3):
KL + CE on prompt positions too, with the target's own argmax as the CE label there, at weight 0 .302,
0.5 .315, 1.0 .313 (a step costs ~30% more); a second layer copied from the target's *last* layer instead
of layer 1: .272. Overfitting limits the recipe (a few epochs of ~35k response tokens), so the default
also takes longer responses (128 tokens) as data. On that data (250 steps): untying the input embedding
and training it (head kept) .297 against .294, for 20% more time per step: not taken.
Session 3 (data per minute): bf16 autocast against float32 training, 250 steps on the same data, dev .2996
vs .2999 at ~1.5x the steps/s; bf16 teacher generation plus sampled repeats gave 72k response tokens in
9.6 min (float32 greedy, session 2: 38.6k in ~7.5-8.5 min), and 1000 steps on them test .355 / dev .345
(seed 0), test .356 / dev .354 (seed 1, same data) against .326 / .336 before.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
import zlib
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from speckv.data.models import publish_dir, write_marker
from speckv.data.prompts import load_prompt_file
from speckv.profiling.cpu import cpu_info, resolve_auto_dtype
from speckv.profiling.errors import SpeckvError

__all__ = [
    "DistillConfig",
    "agreement_by_task",
    "build_draft",
    "distill",
    "generate_teacher_data",
    "plan_teacher_rows",
    "teacher_labels",
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
    gen_batch_size: int = 48  # prompts per batched target generation
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


def save_dtype(name: str, what: str = "save_dtype") -> torch.dtype:
    if name not in ("float32", "float16", "bfloat16"):
        raise SpeckvError(f"{what} must be float32, float16 or bfloat16, got {name!r}")
    return getattr(torch, name)


def resolve_config(config: DistillConfig) -> DistillConfig:
    """`auto` dtypes resolved for this CPU (profiling.cpu), so the cache key and model card say what ran."""
    return replace(
        config,
        teacher_dtype=resolve_auto_dtype(config.teacher_dtype),
        train_autocast=resolve_auto_dtype(config.train_autocast),
    )


def check_config(config: DistillConfig) -> None:
    """Reject settings that would only fail (or silently misbehave) minutes into the run."""
    config = resolve_config(config)
    save_dtype(config.save_dtype)
    save_dtype(config.teacher_dtype, "teacher_dtype")
    if config.train_autocast not in ("float32", "bfloat16"):
        raise SpeckvError(f"train_autocast must be float32 or bfloat16, got {config.train_autocast!r}")
    if config.sequences_per_task < 1 or config.steps < 1 or config.max_new_tokens < 1:
        raise SpeckvError("sequences_per_task, steps and max_new_tokens must be positive")
    if not config.sample_temperature > 0:
        raise SpeckvError(f"sample_temperature must be positive, got {config.sample_temperature}")


def set_seed(seed: int) -> None:
    torch.manual_seed(seed)


# ---- teacher data ----------------------------------------------------------------------------------------


def row_key(row: dict) -> str:
    """A teacher row's cache key: its `key` from `plan_teacher_rows`, else (dev/test rows) its prompt id."""
    return row.get("key", row["prompt_id"])


def plan_teacher_rows(rows: list[dict], sequences_per_task: int) -> list[dict]:
    """The teacher sequences to make: per task, a greedy response to each of its first `sequences_per_task`
    prompts, then sampled responses to its prompts in turn until the task has `sequences_per_task`.

    Each row gets `key` (the prompt id, `#s<k>` appended for the k-th sampled repeat) and `sample` (k, 0 for
    the greedy response).
    """
    by_task: dict[str, list[dict]] = {}
    for r in rows:
        by_task.setdefault(r["task"], []).append(r)
    plan = []
    for task_rows in by_task.values():
        for n in range(sequences_per_task):
            r, k = task_rows[n % len(task_rows)], n // len(task_rows)
            plan.append({**r, "key": r["prompt_id"] if k == 0 else f"{r['prompt_id']}#s{k}", "sample": k})
    return plan


@torch.no_grad()
def generate_batch(
    target: Any,
    rows: list[dict],
    max_new_tokens: int,
    pad_id: int,
    eos_id: int,
    temperature: float = 0.0,
) -> list[dict[str, torch.Tensor]]:
    """Target responses for one batch (greedy, or sampled at `temperature` > 0 from the global torch RNG),
    with the target's final hidden state at every position.

    Returns per prompt `tokens` (prompt + response up to and including EOS), `hidden` [len(tokens) - 1, H]
    in fp16 (position i predicts token i + 1) and `n_prompt`.
    """
    captured: list[torch.Tensor] = []
    hook = target.model.norm.register_forward_hook(lambda _m, _i, out: captured.append(out.detach()))
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
        if temperature > 0
        else {"do_sample": False}
    )
    try:
        width = max(len(r["input_ids"]) for r in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids = torch.tensor(r["input_ids"], dtype=torch.long)
            input_ids[i, width - len(ids) :] = ids
            mask[i, width - len(ids) :] = 1
        out = target.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad_id,
            eos_token_id=eos_id,
            **sampling,
        )
    finally:
        hook.remove()
    hidden = torch.cat(captured, dim=1)  # [B, width + generated − 1, H]
    results = []
    for i, r in enumerate(rows):
        n_prompt = len(r["input_ids"])
        response = out[i, width:]
        ends = (response == eos_id).nonzero()
        n_resp = int(ends[0]) + 1 if len(ends) else len(response)
        tokens = torch.cat([torch.tensor(r["input_ids"]), response[:n_resp]])
        h = hidden[i, width - n_prompt : width - 1 + n_resp]
        results.append(
            {"tokens": tokens.to(torch.int32), "hidden": h.to(torch.float16), "n_prompt": n_prompt}
        )
    return results


def generate_teacher_data(
    target: Any,
    rows: list[dict],
    max_new_tokens: int,
    batch_size: int,
    pad_id: int,
    eos_id: int,
    temperature: float = 0.0,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Teacher sequences for all `rows`, batched by similar prompt length to waste little on padding.

    Sampled batches (`temperature` > 0) seed the torch RNG from `seed` and the batch's first row key, so a
    from-scratch run is reproducible.
    """
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
    seqs: dict[int, dict] = {}
    start = time.perf_counter()
    n_generated = 0
    for b in range(0, len(order), batch_size):
        idx = order[b : b + batch_size]
        if temperature > 0:
            torch.manual_seed(seed * 1_000_003 + zlib.crc32(row_key(rows[idx[0]]).encode("utf-8")))
        batch = generate_batch(target, [rows[i] for i in idx], max_new_tokens, pad_id, eos_id, temperature)
        for i, seq in zip(idx, batch, strict=True):
            seqs[i] = {
                **seq,
                "prompt_id": rows[i]["prompt_id"],
                "task": rows[i]["task"],
                "sample": rows[i].get("sample", 0),
                "temperature": temperature,
            }
            n_generated += len(seq["tokens"]) - seq["n_prompt"]
        elapsed = time.perf_counter() - start
        log.info(
            "teacher%s: %d/%d prompts, %d response tokens, %.0f s (%.1f tok/s)",
            f" (sampled, T={temperature})" if temperature > 0 else "",
            len(seqs),
            len(rows),
            n_generated,
            elapsed,
            n_generated / elapsed,
        )
    return [seqs[i] for i in range(len(rows))]


def load_or_generate_teacher(
    path: Path,
    target: Any,
    rows: list[dict],
    config: DistillConfig,
    pad_id: int,
    eos_id: int,
) -> list[dict[str, Any]]:
    """Teacher sequences for `rows`, cached per row key at `path`; only rows not cached are generated.

    Rows with `sample` > 0 are sampled at `config.sample_temperature`, the others greedy. The cache holds
    sequences made by a target of one dtype with one `max_new_tokens`; a cached sequence counts only if it
    starts with the row's prompt ids and was made at the temperature asked for, so growing
    `sequences_per_task` costs just the new sequences.
    """
    dtype = str(next(target.parameters()).dtype).removeprefix("torch.")
    cached: dict[str, dict] = {}
    if path.is_file():
        data = torch.load(path, weights_only=True)
        # Caches written before the dtype was recorded were made by the float32 target.
        if data.get("max_new_tokens") == config.max_new_tokens and data.get("dtype", "float32") == dtype:
            cached = data["seqs"]

    def temperature(row: dict) -> float:
        return config.sample_temperature if row.get("sample", 0) > 0 else 0.0

    def fresh(row: dict) -> bool:
        seq = cached.get(row_key(row))
        return (
            seq is not None
            and seq["tokens"][: len(row["input_ids"])].tolist() == row["input_ids"]
            and seq.get("temperature", 0.0) == temperature(row)
        )

    missing = [r for r in rows if not fresh(r)]
    log.info("teacher data: %d of %d sequences cached in %s", len(rows) - len(missing), len(rows), path)
    if missing:
        for t in sorted({temperature(r) for r in missing}):
            group = [r for r in missing if temperature(r) == t]
            made = generate_teacher_data(
                target, group, config.max_new_tokens, config.gen_batch_size, pad_id, eos_id, t, config.seed
            )
            cached.update({row_key(r): s for r, s in zip(group, made, strict=True)})
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save({"max_new_tokens": config.max_new_tokens, "dtype": dtype, "seqs": cached}, tmp)
        tmp.replace(path)
    return [cached[row_key(r)] for r in rows]


# ---- draft model -----------------------------------------------------------------------------------------


def build_draft(target: Any, n_layers: int) -> Any:
    """A Llama with the target's config, embedding/head and first `n_layers` layers (copied, not shared)."""
    from transformers import AutoModelForCausalLM

    if not 1 <= n_layers <= target.config.num_hidden_layers:
        raise SpeckvError(f"draft_layers must be in 1..{target.config.num_hidden_layers}, got {n_layers}")
    config = target.config.__class__.from_dict(target.config.to_dict())
    config.num_hidden_layers = n_layers
    config.tie_word_embeddings = True
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:n_layers]
    draft = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {k: v for k, v in target.state_dict().items() if k in draft.state_dict()}
    draft.load_state_dict(state, strict=False)
    draft.tie_weights()
    return draft


def pick_vocab(seqs: list[dict], size: int, vocab_size: int) -> torch.Tensor:
    """The `size` token ids the target emits most often in its responses (sorted ids)."""
    counts: Counter[int] = Counter()
    for s in seqs:
        counts.update(s["tokens"][s["n_prompt"] :].tolist())
    ids = [t for t, _ in counts.most_common(size)]
    # Pad with the lowest unused ids so the restricted head always has `size` rows, whatever the data.
    used = set(ids)
    ids += [t for t in range(vocab_size) if t not in used][: max(0, min(size, vocab_size) - len(ids))]
    return torch.tensor(sorted(ids), dtype=torch.long)


def make_batches(seqs: list[dict], batch_tokens: int, generator: torch.Generator) -> list[list[int]]:
    """Sequence indices grouped by similar length, about `batch_tokens` positions each, in shuffled order."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]["tokens"]))
    batches, current, width = [], [], 0
    for i in order:
        n = len(seqs[i]["tokens"]) - 1
        if current and max(width, n) * (len(current) + 1) > batch_tokens:
            batches.append(current)
            current, width = [], 0
        current.append(i)
        width = max(width, n)
    if current:
        batches.append(current)
    perm = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[p] for p in perm]


def collate(
    seqs: list[dict], idx: list[int], prompt_weight: float, labels: list[torch.Tensor] | None = None
) -> tuple[torch.Tensor, ...]:
    """Right-padded inputs, target hidden states, per-position loss weights and (given per-sequence
    `labels`) the teacher's top tokens; without `labels` the last item is None.

    Weights are 0 on padding, `prompt_weight` on prompt positions and 1 on response positions. A sampled
    repeat's prompt positions weigh 0: its greedy sibling already carries them (same prompt, same states).
    """
    width = max(len(seqs[i]["tokens"]) - 1 for i in idx)
    hidden_size = seqs[idx[0]]["hidden"].shape[-1]
    inputs = torch.zeros((len(idx), width), dtype=torch.long)
    hidden = torch.zeros((len(idx), width, hidden_size))
    weight = torch.zeros((len(idx), width))
    top = None if labels is None else torch.zeros((len(idx), width), dtype=torch.long)
    for row, i in enumerate(idx):
        s = seqs[i]
        n = len(s["tokens"]) - 1
        inputs[row, :n] = s["tokens"][:-1].long()
        hidden[row, :n] = s["hidden"].float()
        if top is not None:
            top[row, :n] = labels[i]
        # Position p predicts token p + 1: it is a response position from the last prompt token on.
        weight[row, : s["n_prompt"] - 1] = prompt_weight if s.get("sample", 0) == 0 else 0.0
        weight[row, s["n_prompt"] - 1 : n] = 1.0
    return inputs, hidden, weight, top


def teacher_labels(seqs: list[dict], head_rows: torch.Tensor, chunk: int = 4096) -> list[torch.Tensor]:
    """The target's top token over the restricted vocab (an index into `head_rows`) at every position of
    every sequence, in float32, once: the training loop may round the teacher's logits to bfloat16."""
    labels = []
    with torch.no_grad():
        for s in seqs:
            h = s["hidden"]
            labels.append(
                torch.cat(
                    [(h[i : i + chunk].float() @ head_rows.T).argmax(-1) for i in range(0, len(h), chunk)]
                )
            )
    return labels


def distill_loss(
    draft_hidden: torch.Tensor,
    target_hidden: torch.Tensor,
    weight: torch.Tensor,
    head_rows: torch.Tensor,
    config: DistillConfig,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """KL(target ‖ draft) + ce_weight·CE(target's argmax) on the restricted vocab at response positions
    (weight 1; prompt positions count `prompt_head_weight`), + cosine_weight·(1 − cos) to the target's hidden
    state at every position with weight > 0.

    The CE label is the target's own top choice at the position (`head_rows` are the restricted vocab's
    head rows; `labels`, from `teacher_labels`, or computed here in float32): on a greedy response that is
    the next token, on a sampled one or a prompt it is not. With `prompt_head_weight` 0 prompt positions
    skip the head: they are most positions and the head is the costliest part of a step.
    """
    response = weight == 1.0
    head_weight = response.float()
    if config.prompt_head_weight > 0:
        prompt = (weight > 0) & ~response
        head_weight = head_weight + config.prompt_head_weight * prompt.float()
    use = head_weight > 0
    w = head_weight[use]
    draft_logits = draft_hidden[use] @ head_rows.T
    target_logits = target_hidden[use] @ head_rows.T  # bf16 under autocast: soft targets only
    target_logp = F.log_softmax(target_logits.float(), dim=-1)
    draft_logp = F.log_softmax(draft_logits.float(), dim=-1)
    kl = (target_logp.exp() * (target_logp - draft_logp)).sum(-1)
    if labels is None:
        with torch.autocast("cpu", enabled=False):
            top = (target_hidden[use].float() @ head_rows.float().T).argmax(-1)
    else:
        top = labels[use]
    ce = F.nll_loss(draft_logp, top, reduction="none")
    head = ((kl + config.ce_weight * ce) * w).sum() / w.sum()
    cos = F.cosine_similarity(draft_hidden.float(), target_hidden.float(), dim=-1)
    cosine = ((1.0 - cos) * weight).sum() / weight.sum()
    return head + config.cosine_weight * cosine


def lr_at(step: int, config: DistillConfig) -> float:
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def train_draft(
    draft: Any, seqs: list[dict], vocab_ids: torch.Tensor, config: DistillConfig
) -> dict[str, Any]:
    """Train the draft's layers and final norm in place; returns loss history and timing."""
    for p in draft.model.embed_tokens.parameters():
        p.requires_grad_(False)
    params = [p for p in draft.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    head_rows = draft.model.embed_tokens.weight.detach()[vocab_ids]
    autocast = resolve_auto_dtype(config.train_autocast) == "bfloat16"
    labels = teacher_labels(seqs, head_rows)
    generator = torch.Generator().manual_seed(config.seed)
    batches: list[list[int]] = []
    losses = []
    start = time.perf_counter()
    draft.train()
    for step in range(config.steps):
        if not batches:
            batches = make_batches(seqs, config.batch_tokens, generator)
        inputs, target_hidden, weight, top = collate(seqs, batches.pop(), config.prompt_weight, labels)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config)
        # bfloat16 autocast runs the matmuls in bf16 (fp32 master weights, softmaxes in fp32).
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = draft.model(input_ids=inputs, use_cache=False)
            loss = distill_loss(out.last_hidden_state, target_hidden, weight, head_rows, config, top)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == config.steps - 1:
            recent = sum(losses[-50:]) / len(losses[-50:])
            log.info(
                "train step %d/%d loss %.4f (%.0f s)",
                step + 1,
                config.steps,
                recent,
                time.perf_counter() - start,
            )
    draft.eval()
    return {"train_s": time.perf_counter() - start, "final_loss": sum(losses[-50:]) / len(losses[-50:])}


# ---- evaluation ------------------------------------------------------------------------------------------


@torch.no_grad()
def agreement_by_task(draft: Any, seqs: list[dict]) -> dict[str, Any]:
    """Top-1 agreement of the draft's full-vocab argmax with the target's greedy response tokens."""
    hits: Counter[str] = Counter()
    totals: Counter[str] = Counter()
    for s in seqs:
        tokens = s["tokens"].long()
        n_resp = len(tokens) - s["n_prompt"]
        if n_resp == 0:
            continue
        logits = draft(input_ids=tokens[None, :-1], use_cache=False).logits[0, s["n_prompt"] - 1 :]
        agree = int((logits.argmax(-1) == tokens[s["n_prompt"] :]).sum())
        hits[s["task"]] += agree
        totals[s["task"]] += n_resp
    per_task = {t: hits[t] / totals[t] for t in sorted(totals)}
    overall = sum(hits.values()) / max(1, sum(totals.values()))
    return {"overall": overall, "per_task": per_task, "tokens": dict(totals)}


# ---- the whole stage -------------------------------------------------------------------------------------


def model_card(config: DistillConfig, metrics: dict[str, Any]) -> str:
    dev, test = metrics["agreement"], metrics["agreement_test"]
    per_task = "\n".join(
        f"| {t} | {test['per_task'].get(t, float('nan')):.3f} | {test['tokens'].get(t, 0)} "
        f"| {a:.3f} | {dev['tokens'][t]} |"
        for t, a in dev["per_task"].items()
    )
    return f"""# SpecKV default draft (distilled from SmolLM2-135M-Instruct)

A {config.draft_layers}-layer Llama drafter for speculative decoding with the embedded SmolLM2-135M-Instruct
target (same tokenizer and chat template). Built by `speckv models distill` (`data/distill.py`).

## How it was made
- Initialised from the target's embedding (tied head, frozen) and first {config.draft_layers} decoder
  layers; the layers and final norm were trained. The saved head is the target's full-vocab head, so no
  token is unreachable.
- Data: the target's responses (at most {config.max_new_tokens} new tokens, target run in
  {config.teacher_dtype}) to {metrics["n_train_prompts"]} distill-split prompts (chat template on): a greedy
  response to each, plus {metrics["n_train_sampled"]} sampled responses (temperature {config.sample_temperature})
  to the prompts of tasks with fewer than {config.sequences_per_task} prompts; sequences per task:
  {", ".join(f"{t} {n}" for t, n in sorted(metrics["train_sequences_per_task"].items()))}. {metrics["n_train_response_tokens"]} response and
  {metrics["n_train_prompt_tokens"]} prompt positions, each labelled with the target's final hidden state.
- Loss: on response positions (prompt positions weighted {config.prompt_head_weight}), KL(target || draft)
  + {config.ce_weight} * cross-entropy on the target's own top token, both over the {config.restricted_vocab} tokens the target emits most
  ({metrics["vocab_coverage"]:.1%} of response tokens); plus {config.cosine_weight} * (1 - cos) to the
  target's hidden state at every position (prompt positions weighted {config.prompt_weight}).
- {config.steps} AdamW steps ({config.train_autocast} autocast) of about {config.batch_tokens} positions, lr {config.lr} (warmup
  {config.warmup_steps}, cosine), seed {config.seed}.

## Measured (CPU: {metrics["cpu"]["model"]}, {metrics["cpu"]["capability"]}, native bf16 {metrics["cpu"]["native_bf16"]}; timings are noisy)
Held-out top-1 agreement with the target's greedy tokens: **{metrics["agreement_test"]["overall"]:.3f}** on
{metrics["n_test_prompts"]} test-split prompts, {metrics["agreement"]["overall"]:.3f} on {metrics["n_dev_prompts"]} dev-split prompts.

| task | test agreement | test tokens | dev agreement | dev tokens |
| --- | --- | --- | --- | --- |
{per_task}

- Teacher generation {metrics["teacher_s"]:.0f} s in this run ({metrics["teacher_train_s"]:.0f} s of it for
  the training data; cached sequences cost none), training {metrics["train_s"]:.0f} s
  ({config.train_autocast} autocast).
- 1-token forward after a cached 64-token context (median of 40, plain transformers, no SpecKV CPU
  kernels): draft {metrics["draft_forward_ms"]:.1f} ms, target {metrics["target_forward_ms"]:.1f} ms.

Config: `{json.dumps(asdict(config))}`
"""


def distill(
    target_dir: Path, prompt_path: Path, out_dir: Path, teacher_path: Path, config: DistillConfig
) -> dict[str, Any]:
    """Distil a draft from the target in `target_dir`, write it to `out_dir` atomically, return metrics."""
    from speckv.profiling.calibrate import forward_ms
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_config(config)
    config = resolve_config(config)
    torch.set_num_threads(config.threads)
    set_seed(config.seed)
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    distill_rows = load_prompt_file(prompt_path, splits=["distill"])
    train_rows = plan_teacher_rows(distill_rows, config.sequences_per_task)
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
    train_seqs = load_or_generate_teacher(
        teacher_path, teacher, train_rows, config, pad_id, tokenizer.eos_token_id
    )
    del teacher
    teacher_train_s = time.perf_counter() - t0
    dev_path = teacher_path.with_name(teacher_path.stem + "-dev" + teacher_path.suffix)
    dev_seqs = load_or_generate_teacher(dev_path, target, dev_rows, config, pad_id, tokenizer.eos_token_id)
    test_path = teacher_path.with_name(teacher_path.stem + "-test" + teacher_path.suffix)
    test_seqs = load_or_generate_teacher(test_path, target, test_rows, config, pad_id, tokenizer.eos_token_id)
    teacher_s = time.perf_counter() - t0
    n_sampled = sum(s.get("sample", 0) > 0 for s in train_seqs)

    vocab_ids = pick_vocab(train_seqs, config.restricted_vocab, target.config.vocab_size)
    vocab_set = set(vocab_ids.tolist())
    response_tokens = [t for s in train_seqs for t in s["tokens"][s["n_prompt"] :].tolist()]
    set_seed(config.seed)
    draft = build_draft(target, config.draft_layers)
    train_stats = train_draft(draft, train_seqs, vocab_ids, config)

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=".distill-") as work:
        build_dir = Path(work) / "draft"
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
            "config": asdict(config),
        }
        (build_dir / "README.md").write_text(model_card(config, metrics))
        (build_dir / "agreement.json").write_text(json.dumps(metrics, indent=2) + "\n")
        write_marker(build_dir, {"target": str(target_dir), "config": asdict(config)})
        publish_dir(build_dir, out_dir)
    log.info(
        "draft written to %s: agreement test %.3f %s, dev %.3f",
        out_dir,
        metrics["agreement_test"]["overall"],
        {t: round(a, 3) for t, a in metrics["agreement_test"]["per_task"].items()},
        metrics["agreement"]["overall"],
    )
    return metrics
