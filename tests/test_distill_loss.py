"""The distillation loss and its batches: head terms on the right positions, a bf16-safe teacher, cached
teacher targets equal to computing them inside, and sampled repeats collated without their prompt."""

from __future__ import annotations

import pytest
import speckv.data.distill_loss as loss_mod
import speckv.data.draft_training as training_mod
import torch
from speckv.data.distill import DistillConfig


def test_distill_loss_head_terms_see_only_response_positions() -> None:
    """With prompt_head_weight 0, KL and CE skip prompt positions (cosine only there); CE pulls the draft
    towards the target's own top token."""
    torch.manual_seed(0)
    head_rows = torch.randn(8, 4)
    target_hidden, draft_hidden = torch.randn(1, 3, 4), torch.randn(1, 3, 4)
    weight = torch.tensor([[0.5, 1.0, 1.0]])  # position 0 is a prompt position
    config = DistillConfig(cosine_weight=0.0, ce_weight=1.0, prompt_head_weight=0.0)
    loss = loss_mod.distill_loss(draft_hidden, target_hidden, weight, head_rows, config)
    moved = draft_hidden.clone()
    moved[0, 0] += 10.0
    assert torch.isclose(loss, loss_mod.distill_loss(moved, target_hidden, weight, head_rows, config))

    def ce_term(hidden: torch.Tensor) -> torch.Tensor:
        no_ce = DistillConfig(cosine_weight=0.0, ce_weight=0.0, prompt_head_weight=0.0)
        with_ce = loss_mod.distill_loss(hidden, target_hidden, weight, head_rows, config)
        return with_ce - loss_mod.distill_loss(hidden, target_hidden, weight, head_rows, no_ce)

    top = (target_hidden[0, 1:] @ head_rows.T).argmax(-1)
    towards_top, away = draft_hidden.clone(), draft_hidden.clone()
    towards_top[0, 1:] = 5.0 * head_rows[top]
    away[0, 1:] = 5.0 * head_rows[(top + 1) % 8]
    assert ce_term(towards_top) < ce_term(away)


def test_distill_loss_prompt_head_weight_labels_prompt_positions_with_the_targets_argmax() -> None:
    torch.manual_seed(0)
    head_rows = torch.randn(8, 4)
    target_hidden, draft_hidden = torch.randn(1, 3, 4), torch.randn(1, 3, 4)
    weight = torch.tensor([[0.5, 1.0, 1.0]])
    config = DistillConfig(cosine_weight=0.0, ce_weight=1.0, prompt_head_weight=0.5)
    base = loss_mod.distill_loss(draft_hidden, target_hidden, weight, head_rows, config)
    target_choice = int((target_hidden[0, 0] @ head_rows.T).argmax())
    agree, disagree = draft_hidden.clone(), draft_hidden.clone()
    agree[0, 0] = 5.0 * head_rows[target_choice]
    disagree[0, 0] = 5.0 * head_rows[(target_choice + 1) % 8]
    with_agree = loss_mod.distill_loss(agree, target_hidden, weight, head_rows, config)
    with_disagree = loss_mod.distill_loss(disagree, target_hidden, weight, head_rows, config)
    assert not torch.isclose(base, with_agree)  # the prompt position now counts
    assert with_agree < with_disagree


def test_distill_loss_under_bf16_autocast_keeps_the_teacher_in_float32() -> None:
    """Autocast may round the draft's logits, not the teacher's: the loss stays close to the fp32 one."""
    torch.manual_seed(0)
    head_rows = torch.randn(64, 16)
    target_hidden, draft_hidden = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    weight = torch.tensor([[0.5, 1.0, 1.0, 1.0, 0.0], [0.0, 0.5, 1.0, 1.0, 1.0]])
    config = DistillConfig()
    exact = loss_mod.distill_loss(draft_hidden, target_hidden, weight, head_rows, config)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = loss_mod.distill_loss(draft_hidden, target_hidden, weight, head_rows, config)
    assert mixed.dtype == torch.float32 and torch.isclose(mixed, exact, rtol=2e-2)


@pytest.mark.parametrize("prompt_head_weight", [0.5, 0.0])
def test_precomputed_teacher_targets_give_the_loss_and_gradient_of_the_teacher_computed_inside(
    prompt_head_weight: float,
) -> None:
    """`teacher_targets` (float32 labels, float16 probabilities from `head_start` on) collated for a greedy
    and a sampled sequence of different lengths: same loss and draft gradient as the teacher's logits
    computed in the loss, so no position whose head terms count was left out of the cache."""
    torch.manual_seed(0)
    head_rows = torch.randn(64, 16)
    seqs = [
        {"tokens": torch.arange(7, dtype=torch.int32), "hidden": torch.randn(6, 16).half(), "n_prompt": 3},
        {
            "tokens": torch.arange(5, dtype=torch.int32),
            "hidden": torch.randn(4, 16).half(),
            "n_prompt": 2,
            "sample": 1,
        },
    ]
    config = DistillConfig(prompt_head_weight=prompt_head_weight)
    targets = loss_mod.teacher_targets(seqs, head_rows, prompt_head_weight)
    assert [t.start for t in targets] == [0 if prompt_head_weight else 2, 1]
    inputs, hidden, weight, top, probs, neg_entropy = training_mod.collate(seqs, [0, 1], 0.5, targets)
    assert top is not None and probs is not None and neg_entropy is not None
    _, hidden_plain, weight_plain, none, _, _ = training_mod.collate(seqs, [0, 1], 0.5)
    assert none is None and torch.equal(hidden, hidden_plain) and torch.equal(weight, weight_plain)
    draft = torch.randn(hidden.shape, requires_grad=True)
    cached = loss_mod.distill_loss(draft, hidden, weight, head_rows, config, top, probs, neg_entropy)
    (grad_cached,) = torch.autograd.grad(cached, draft)
    plain = loss_mod.distill_loss(draft, hidden, weight, head_rows, config)
    (grad_plain,) = torch.autograd.grad(plain, draft)
    assert torch.isclose(cached, plain, rtol=1e-3)
    assert torch.allclose(grad_cached, grad_plain, rtol=1e-2, atol=1e-4)


def test_collate_drops_the_duplicate_prompt_of_a_sampled_repeat() -> None:
    seq = {
        "tokens": torch.tensor([1, 2, 3, 4, 5], dtype=torch.int32),
        "hidden": torch.zeros(4, 2),
        "n_prompt": 3,
    }
    seqs = [{**seq, "sample": 0}, {**seq, "sample": 1}]
    _, _, weight, top, _, _ = training_mod.collate(seqs, [0, 1], prompt_weight=0.5)
    assert top is None
    assert weight.tolist() == [[0.5, 0.5, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]]
