"""The distillation loss (step 3 of the recipe in `data/distill.py`): KL and cross-entropy on the target's
restricted vocabulary, plus a cosine term to its final hidden state.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from speckv.data.distill import DistillConfig

__all__ = ["distill_loss", "teacher_labels"]


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
