"""Distil the default draft from the default target's own behaviour on the train prompts.

Recipe ("shallow copy", chosen because it reuses the target's output space exactly):
1. Teacher data: the target's greedy responses to the train prompts (batched, left padded); a hook on its
   final norm records the final hidden state at every prompt and response position, cached in one file.
2. Draft: a 2-layer Llama initialised from the target's first 2 layers, sharing the target's (tied) embedding
   and head, both frozen. Only the layers and final norm train, so the saved model has the full-vocab head.
3. Loss: on response positions, KL from the target's distribution restricted to its most frequent tokens
   (logits = hidden @ E_r^T, exact because the head is shared) + cross-entropy on the target's greedy token
   (agreement is a top-1 metric); at all positions, w·(1 − cosine) between draft and target final hidden.
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
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from data.models import DRAFT_DIRNAME, fetch_target, publish_dir, write_marker
from data.prompts import PromptsConfig, build_prompt_file, load_prompt_file
from profiling.errors import SpeckvError

__all__ = [
    "DistillConfig",
    "agreement_by_task",
    "build_draft",
    "distill",
    "distill_default",
    "forward_ms",
    "generate_teacher_data",
    "train_draft",
]

log = logging.getLogger(__name__)


@dataclass
class DistillConfig:
    """The `distill:` section of params.yaml."""

    seed: int = 0  # seeds prompt order, initialisation and batching
    draft_layers: int = 2  # decoder layers, copied from the target's first layers
    distill_per_task: int = 120  # distill-split prompts per task for teacher data (fewer if fewer)
    dev_per_task: int = 10  # dev prompts per task for held-out agreement (recipe choices were made on it)
    test_per_task: int = 10  # test prompts per task for the reported agreement (never used for a choice)
    max_new_tokens: int = 128  # target response length cap for teacher data
    gen_batch_size: int = 48  # prompts per batched target generation
    restricted_vocab: int = 8192  # most frequent target tokens the training loss is computed on
    steps: int = 800  # optimizer steps
    batch_tokens: int = 1024  # token positions per optimizer step (whole sequences, right padded)
    lr: float = 3e-3  # AdamW peak learning rate (warmup then cosine decay)
    warmup_steps: int = 30  # linear warmup before cosine decay
    cosine_weight: float = 1.0  # weight of 1 − cos(draft hidden, target hidden)
    ce_weight: float = 1.0  # weight of cross-entropy on the target's greedy token (agreement is top-1)
    prompt_weight: float = 0.5  # cosine-loss weight of prompt positions
    prompt_head_weight: float = 0.5  # KL + CE weight of prompt positions (0: responses only)
    save_dtype: str = "float16"  # halves the head's memory traffic: 1-token forward ~15 -> ~9 ms on this CPU
    threads: int = 2  # torch CPU threads; use 1 when other jobs share the cores (2 then ran 10x slower)


def save_dtype(name: str) -> torch.dtype:
    if name not in ("float32", "float16", "bfloat16"):
        raise SpeckvError(f"save_dtype must be float32, float16 or bfloat16, got {name!r}")
    return getattr(torch, name)


def set_seed(seed: int) -> None:
    torch.manual_seed(seed)


# ---- teacher data ----------------------------------------------------------------------------------------


@torch.no_grad()
def generate_batch(
    target: Any, rows: list[dict], max_new_tokens: int, pad_id: int, eos_id: int
) -> list[dict[str, torch.Tensor]]:
    """Greedy target responses for one batch, with the target's final hidden state at every position.

    Returns per prompt `tokens` (prompt + response up to and including EOS), `hidden` [len(tokens) - 1, H]
    in fp16 (position i predicts token i + 1) and `n_prompt`.
    """
    captured: list[torch.Tensor] = []
    hook = target.model.norm.register_forward_hook(lambda _m, _i, out: captured.append(out.detach()))
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
            do_sample=False,
            pad_token_id=pad_id,
            eos_token_id=eos_id,
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
    target: Any, rows: list[dict], max_new_tokens: int, batch_size: int, pad_id: int, eos_id: int
) -> list[dict[str, Any]]:
    """Teacher sequences for all `rows`, batched by similar prompt length to waste little on padding."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
    seqs: dict[int, dict] = {}
    start = time.perf_counter()
    n_generated = 0
    for b in range(0, len(order), batch_size):
        idx = order[b : b + batch_size]
        for i, seq in zip(
            idx, generate_batch(target, [rows[i] for i in idx], max_new_tokens, pad_id, eos_id), strict=True
        ):
            seqs[i] = {**seq, "prompt_id": rows[i]["prompt_id"], "task": rows[i]["task"]}
            n_generated += len(seq["tokens"]) - seq["n_prompt"]
        elapsed = time.perf_counter() - start
        log.info(
            "teacher: %d/%d prompts, %d response tokens, %.0f s (%.1f tok/s)",
            len(seqs),
            len(rows),
            n_generated,
            elapsed,
            n_generated / elapsed,
        )
    return [seqs[i] for i in range(len(rows))]


def load_or_generate_teacher(
    path: Path, target: Any, rows: list[dict], config: DistillConfig, pad_id: int, eos_id: int
) -> list[dict[str, Any]]:
    """Teacher sequences for `rows`, cached per prompt at `path`; only prompts not cached are generated.

    A cached sequence counts only if it was made with the same `max_new_tokens` from the same prompt ids, so
    growing `distill_per_task` costs just the new prompts.
    """
    cached: dict[str, dict] = {}
    if path.is_file():
        data = torch.load(path, weights_only=True)
        if data.get("max_new_tokens") == config.max_new_tokens:
            cached = data["seqs"]
    missing = [
        r
        for r in rows
        if r["prompt_id"] not in cached
        or cached[r["prompt_id"]]["tokens"][: len(r["input_ids"])].tolist() != r["input_ids"]
    ]
    log.info("teacher data: %d of %d prompts cached in %s", len(rows) - len(missing), len(rows), path)
    if missing:
        fresh = generate_teacher_data(
            target, missing, config.max_new_tokens, config.gen_batch_size, pad_id, eos_id
        )
        cached.update({s["prompt_id"]: s for s in fresh})
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save({"max_new_tokens": config.max_new_tokens, "seqs": cached}, tmp)
        tmp.replace(path)
    return [cached[r["prompt_id"]] for r in rows]


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


def collate(seqs: list[dict], idx: list[int], prompt_weight: float) -> tuple[torch.Tensor, ...]:
    """Right-padded inputs, next tokens, target hidden states and per-position cosine weights.

    Weights are 0 on padding, `prompt_weight` on prompt positions and 1 on response positions (where the
    next token is the target's greedy choice).
    """
    width = max(len(seqs[i]["tokens"]) - 1 for i in idx)
    hidden_size = seqs[idx[0]]["hidden"].shape[-1]
    inputs = torch.zeros((len(idx), width), dtype=torch.long)
    next_tokens = torch.zeros((len(idx), width), dtype=torch.long)
    hidden = torch.zeros((len(idx), width, hidden_size))
    weight = torch.zeros((len(idx), width))
    for row, i in enumerate(idx):
        s = seqs[i]
        n = len(s["tokens"]) - 1
        inputs[row, :n] = s["tokens"][:-1].long()
        next_tokens[row, :n] = s["tokens"][1:].long()
        hidden[row, :n] = s["hidden"].float()
        # Position p predicts token p + 1: it is a response position from the last prompt token on.
        weight[row, : s["n_prompt"] - 1] = prompt_weight
        weight[row, s["n_prompt"] - 1 : n] = 1.0
    return inputs, next_tokens, hidden, weight


def distill_loss(
    draft_hidden: torch.Tensor,
    target_hidden: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor,
    head_rows: torch.Tensor,
    config: DistillConfig,
) -> torch.Tensor:
    """KL(target ‖ draft) + ce_weight·CE(greedy token) on the restricted vocab, response positions (and
    prompt positions at `prompt_head_weight`), + cosine_weight·(1 − cos) to the target's hidden state.

    `labels` index the restricted vocab (−1: not a response position or outside it). On prompt positions the
    CE label is the target's own argmax there (the next prompt token is the user's, not the target's). With
    `prompt_head_weight` 0 prompt positions skip the head: they are most positions and the head is the
    costliest part of a step.
    """
    response = weight == 1.0
    head_weight = response.float()
    if config.prompt_head_weight > 0:
        prompt = (weight > 0) & ~response
        head_weight = head_weight + config.prompt_head_weight * prompt.float()
    use = head_weight > 0
    w = head_weight[use]
    draft_logits = draft_hidden[use] @ head_rows.T
    target_logits = target_hidden[use] @ head_rows.T
    target_logp = F.log_softmax(target_logits, dim=-1)
    draft_logp = F.log_softmax(draft_logits, dim=-1)
    kl = (target_logp.exp() * (target_logp - draft_logp)).sum(-1)
    head_labels = torch.where(response[use], labels[use], target_logits.argmax(-1))
    ce = F.cross_entropy(draft_logits, head_labels.clamp(min=0), reduction="none") * (head_labels >= 0)
    head = ((kl + config.ce_weight * ce) * w).sum() / w.sum()
    cos = F.cosine_similarity(draft_hidden, target_hidden, dim=-1)
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
    vocab_index = torch.full((draft.config.vocab_size,), -1, dtype=torch.long)
    vocab_index[vocab_ids] = torch.arange(len(vocab_ids))
    generator = torch.Generator().manual_seed(config.seed)
    batches: list[list[int]] = []
    losses = []
    start = time.perf_counter()
    draft.train()
    for step in range(config.steps):
        if not batches:
            batches = make_batches(seqs, config.batch_tokens, generator)
        inputs, next_tokens, target_hidden, weight = collate(seqs, batches.pop(), config.prompt_weight)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config)
        out = draft.model(input_ids=inputs, use_cache=False)
        labels = torch.where(weight == 1.0, vocab_index[next_tokens], -1)
        loss = distill_loss(out.last_hidden_state, target_hidden, labels, weight, head_rows, config)
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


@torch.no_grad()
def forward_ms(model: Any, context: int = 64, steps: int = 40) -> float:
    """Median wall time of a 1-token forward with a KV cache after a `context`-token prefill."""
    model.eval()
    ids = torch.randint(3, model.config.vocab_size, (1, context))
    out = model(input_ids=ids, use_cache=True)
    past = out.past_key_values
    times = []
    token = ids[:, -1:]
    for _ in range(steps):
        t0 = time.perf_counter()
        out = model(input_ids=token, past_key_values=past, use_cache=True)
        times.append(time.perf_counter() - t0)
        past = out.past_key_values
    return sorted(times)[len(times) // 2] * 1000.0


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
- Data: the target's greedy responses (at most {config.max_new_tokens} new tokens) to
  {metrics["n_train_prompts"]} distill-split prompts (at most {config.distill_per_task} per task, chat template
  on): {metrics["n_train_response_tokens"]} response and {metrics["n_train_prompt_tokens"]} prompt positions,
  each labelled with the target's final hidden state.
- Loss: on response positions (prompt positions weighted {config.prompt_head_weight}), KL(target || draft)
  + {config.ce_weight} * cross-entropy on the target's greedy token, both over the {config.restricted_vocab} tokens the target emits most
  ({metrics["vocab_coverage"]:.1%} of response tokens); plus {config.cosine_weight} * (1 - cos) to the
  target's hidden state at every position (prompt positions weighted {config.prompt_weight}).
- {config.steps} AdamW steps of about {config.batch_tokens} positions, lr {config.lr} (warmup
  {config.warmup_steps}, cosine), seed {config.seed}.

## Measured (this 2-core CPU, shared; timings are noisy)
Held-out top-1 agreement with the target's greedy tokens: **{metrics["agreement_test"]["overall"]:.3f}** on
{metrics["n_test_prompts"]} test-split prompts, {metrics["agreement"]["overall"]:.3f} on {metrics["n_dev_prompts"]} dev-split prompts.

| task | test agreement | test tokens | dev agreement | dev tokens |
| --- | --- | --- | --- | --- |
{per_task}

- Teacher generation {metrics["teacher_s"]:.0f} s in this run (cached prompts cost none), training
  {metrics["train_s"]:.0f} s.
- 1-token forward with KV cache: draft {metrics["draft_forward_ms"]:.1f} ms, target
  {metrics["target_forward_ms"]:.1f} ms.

Config: `{json.dumps(asdict(config))}`
"""


def distill(
    target_dir: Path, prompt_path: Path, out_dir: Path, teacher_path: Path, config: DistillConfig
) -> dict[str, Any]:
    """Distil a draft from the target in `target_dir`, write it to `out_dir` atomically, return metrics."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(config.threads)
    set_seed(config.seed)
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train_rows = load_prompt_file(prompt_path, splits=["distill"], per_task=config.distill_per_task)
    dev_rows = load_prompt_file(prompt_path, splits=["dev"], per_task=config.dev_per_task)
    test_rows = load_prompt_file(prompt_path, splits=["test"], per_task=config.test_per_task)
    if not train_rows or not dev_rows or not test_rows:
        raise SpeckvError(f"{prompt_path} lacks distill, dev or test prompts")

    t0 = time.perf_counter()
    train_seqs = load_or_generate_teacher(
        teacher_path, target, train_rows, config, pad_id, tokenizer.eos_token_id
    )
    dev_path = teacher_path.with_name(teacher_path.stem + "-dev" + teacher_path.suffix)
    dev_seqs = load_or_generate_teacher(dev_path, target, dev_rows, config, pad_id, tokenizer.eos_token_id)
    test_path = teacher_path.with_name(teacher_path.stem + "-test" + teacher_path.suffix)
    test_seqs = load_or_generate_teacher(test_path, target, test_rows, config, pad_id, tokenizer.eos_token_id)
    teacher_s = time.perf_counter() - t0

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
        # Measure the saved artefact, loaded as users load it.
        saved = AutoModelForCausalLM.from_pretrained(build_dir, dtype="auto").eval()
        metrics = {
            "agreement": agreement_by_task(saved, dev_seqs),
            "agreement_test": agreement_by_task(saved, test_seqs),
            "n_train_prompts": len(train_seqs),
            "n_dev_prompts": len(dev_seqs),
            "n_test_prompts": len(test_seqs),
            "n_train_response_tokens": len(response_tokens),
            "n_train_prompt_tokens": sum(s["n_prompt"] for s in train_seqs),
            "vocab_coverage": sum(t in vocab_set for t in response_tokens) / max(1, len(response_tokens)),
            "teacher_s": teacher_s,
            **train_stats,
            "draft_forward_ms": forward_ms(saved),
            "target_forward_ms": forward_ms(target),
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


def distill_default(
    config: DistillConfig,
    models_root: Path,
    prompt_path: Path = Path("artifacts/prompts/prompts.jsonl"),
    teacher_path: Path = Path("artifacts/distill/teacher.pt"),
) -> dict[str, Any]:
    """Distil the default draft from the default target, building the default prompt file if it is missing."""
    from transformers import AutoTokenizer

    target_dir = fetch_target(models_root)
    if not Path(prompt_path).is_file():
        prompts = PromptsConfig()
        tokenizer = AutoTokenizer.from_pretrained(target_dir)
        build_prompt_file(
            tokenizer, Path(prompt_path), prompts.chat, prompts.max_prompt_tokens, prompts.tasks
        )
    return distill(
        target_dir, Path(prompt_path), Path(models_root) / DRAFT_DIRNAME, Path(teacher_path), config
    )
