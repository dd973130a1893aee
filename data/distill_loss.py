"""The distillation loss (step 3 of the recipe in `data/distill.py`): KL and cross-entropy on the target's
restricted vocabulary, plus a cosine term to its final hidden state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from speckv.data.distill import DistillConfig

__all__ = ["TeacherTargets", "distill_loss", "head_start", "teacher_targets"]


@dataclass
class TeacherTargets:
    """What the loss needs of the teacher at one sequence's positions, computed once in float32.

    `labels` [n]: the target's top token over the restricted vocab (an index into the head rows) at every
    position. `probs` [n - start, V] (float16) and `neg_entropy` [n - start] (sum p log p, float32): its
    restricted-vocab distribution at positions `start`.. (the only ones whose head terms can count, see
    `head_start`). Precomputing them drops the teacher's head matmul and softmax from every step (~20% of a
    float32 step, measured); float16 keeps p to ~1e-3 relative, finer than the bfloat16 logits autocast made.
    """

    labels: torch.Tensor
    probs: torch.Tensor
    neg_entropy: torch.Tensor
    start: int


def head_start(seq: dict, prompt_head_weight: float) -> int:
    """First position whose KL/CE terms can count: 0 on a greedy sequence when prompt positions carry head
    weight, else its last prompt position (a sampled repeat's prompt positions weigh nothing: its greedy
    sibling carries them)."""
    return 0 if seq.get("sample", 0) == 0 and prompt_head_weight > 0 else seq["n_prompt"] - 1


def teacher_targets(
    seqs: list[dict], head_rows: torch.Tensor, prompt_head_weight: float, chunk: int = 2048
) -> list[TeacherTargets]:
    """`TeacherTargets` of every sequence, in float32 (the training loop may round its own logits to bf16)."""
    rows = head_rows.detach().float()
    out = []
    with torch.no_grad(), torch.autocast("cpu", enabled=False):
        for s in seqs:
            h = s["hidden"]
            start = head_start(s, prompt_head_weight)
            labels, probs, neg_entropy = [], [], []
            for i in range(0, len(h), chunk):
                logits = h[i : i + chunk].float() @ rows.T
                labels.append(logits.argmax(-1))
                keep = logits[max(0, start - i) :]
                if len(keep):
                    logp = torch.log_softmax(keep, dim=-1)
                    p = logp.exp()
                    probs.append(p.to(torch.float16))
                    neg_entropy.append((p * logp).sum(-1))
            empty = torch.zeros(0, rows.shape[0])
            out.append(
                TeacherTargets(
                    labels=torch.cat(labels),
                    probs=torch.cat(probs) if probs else empty.to(torch.float16),
                    neg_entropy=torch.cat(neg_entropy) if neg_entropy else empty[:, 0],
                    start=start,
                )
            )
    return out


def distill_loss(
    draft_hidden: torch.Tensor,
    target_hidden: torch.Tensor,
    weight: torch.Tensor,
    head_rows: torch.Tensor,
    config: DistillConfig,
    labels: torch.Tensor | None = None,
    target_probs: torch.Tensor | None = None,
    target_neg_entropy: torch.Tensor | None = None,
) -> torch.Tensor:
    """KL(target ‖ draft) + ce_weight·CE(target's argmax) on the restricted vocab at response positions
    (weight 1; prompt positions count `prompt_head_weight`), + cosine_weight·(1 − cos) to the target's hidden
    state at every position with weight > 0.

    The CE label is the target's own top choice at the position (`head_rows` are the restricted vocab's
    head rows; `labels`, from `teacher_targets`, or computed here in float32): on a greedy response that is
    the next token, on a sampled one or a prompt it is not. Given `target_probs` [B, T, V] and
    `target_neg_entropy` [B, T] (from `teacher_targets`, at least where head terms count) the KL uses them
    instead of the teacher's logits. With `prompt_head_weight` 0 prompt positions
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
    draft_logp = F.log_softmax(draft_logits.float(), dim=-1)
    if target_probs is None or target_neg_entropy is None:
        target_logits = target_hidden[use] @ head_rows.T  # bf16 under autocast: soft targets only
        target_logp = F.log_softmax(target_logits.float(), dim=-1)
        kl = (target_logp.exp() * (target_logp - draft_logp)).sum(-1)
    else:
        kl = target_neg_entropy[use] - (target_probs[use].float() * draft_logp).sum(-1)
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
