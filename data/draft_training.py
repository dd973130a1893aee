"""The draft and its training (step 2 and the loop of step 3 in `data/distill.py`): a copy of the target's
first layers, trained on the teacher data in length-grouped batches under a warmup + cosine learning rate.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

import torch
from speckv.data.distill_loss import TeacherTargets, distill_loss, teacher_targets
from speckv.profiling.cpu import resolve_auto_dtype
from speckv.profiling.errors import SpeckvError

if TYPE_CHECKING:
    from speckv.data.distill import DistillConfig

__all__ = ["build_draft", "collate", "lr_at", "make_batches", "pick_vocab", "train_draft"]

log = logging.getLogger(__name__)


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
    seqs: list[dict], idx: list[int], prompt_weight: float, targets: list[TeacherTargets] | None = None
) -> tuple[torch.Tensor | None, ...]:
    """Right-padded inputs, target hidden states and per-position loss weights; given per-sequence `targets`
    (`teacher_targets`) also the teacher's top tokens, restricted-vocab probabilities and sum p log p (zeros
    before each sequence's `start`, where no head term counts); without them those three are None.

    Weights are 0 on padding, `prompt_weight` on prompt positions and 1 on response positions. A sampled
    repeat's prompt positions weigh 0: its greedy sibling already carries them (same prompt, same states).
    """
    width = max(len(seqs[i]["tokens"]) - 1 for i in idx)
    hidden_size = seqs[idx[0]]["hidden"].shape[-1]
    inputs = torch.zeros((len(idx), width), dtype=torch.long)
    hidden = torch.zeros((len(idx), width, hidden_size))
    weight = torch.zeros((len(idx), width))
    top = probs = neg_entropy = None
    if targets is not None:
        top = torch.zeros((len(idx), width), dtype=torch.long)
        probs = torch.zeros((len(idx), width, targets[idx[0]].probs.shape[-1]), dtype=torch.float16)
        neg_entropy = torch.zeros((len(idx), width))
    for row, i in enumerate(idx):
        s = seqs[i]
        n = len(s["tokens"]) - 1
        inputs[row, :n] = s["tokens"][:-1].long()
        hidden[row, :n] = s["hidden"].float()
        if targets is not None:
            t = targets[i]
            top[row, :n] = t.labels
            probs[row, t.start : n] = t.probs
            neg_entropy[row, t.start : n] = t.neg_entropy
        # Position p predicts token p + 1: it is a response position from the last prompt token on.
        weight[row, : s["n_prompt"] - 1] = prompt_weight if s.get("sample", 0) == 0 else 0.0
        weight[row, s["n_prompt"] - 1 : n] = 1.0
    return inputs, hidden, weight, top, probs, neg_entropy


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
    targets = teacher_targets(seqs, head_rows, config.prompt_head_weight)
    generator = torch.Generator().manual_seed(config.seed)
    batches: list[list[int]] = []
    losses = []
    start = time.perf_counter()
    draft.train()
    for step in range(config.steps):
        if not batches:
            batches = make_batches(seqs, config.batch_tokens, generator)
        inputs, target_hidden, weight, top, probs, neg_entropy = collate(
            seqs, batches.pop(), config.prompt_weight, targets
        )
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config)
        # bfloat16 autocast runs the matmuls in bf16 (fp32 master weights, softmaxes in fp32).
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = draft.model(input_ids=inputs, use_cache=False)
            loss = distill_loss(
                out.last_hidden_state, target_hidden, weight, head_rows, config, top, probs, neg_entropy
            )
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
