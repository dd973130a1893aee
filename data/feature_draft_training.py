"""The feature-conditioned draft's build and training (`profiling/feature_draft.py`), from the same cached
teacher sequences as the standalone draft: the target's tokens and its final hidden state at every position.

Input at position t: the token x_t and the target's feature f_{t-1} (zeros at position 0); target: f_t, the
feature from which the target chose x_{t+1}. The loss is the standalone draft's (`data/distill_loss.py`): KL +
CE on the restricted head, + cosine to f_t. Teacher-forced training feeds the target's features everywhere,
while drafting feeds the draft's own predictions after the first token, so the input features get noise
(`feature_noise` x their per-position RMS, uniform; EAGLE's augmentation) to make later tokens robust.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import torch
from speckv.data.distill_loss import distill_loss, teacher_targets
from speckv.data.draft_training import collate, lr_at, make_batches
from speckv.data.model_card import agreement_of
from speckv.profiling.cpu import resolve_auto_dtype
from speckv.profiling.feature_draft import FeatureDraft, FeatureDraftConfig, shifted_features

if TYPE_CHECKING:
    from speckv.data.distill import DistillConfig

__all__ = ["build_feature_draft", "feature_agreement_by_task", "train_feature_draft"]

log = logging.getLogger(__name__)

_LAYER_COPY = {
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "o_proj": "self_attn.o_proj",
    "gate_proj": "mlp.gate_proj",
    "up_proj": "mlp.up_proj",
    "down_proj": "mlp.down_proj",
    "input_norm": "input_layernorm",
    "post_norm": "post_attention_layernorm",
}


def build_feature_draft(
    target: Any, vocab_ids: torch.Tensor, init_layer: int | None, target_name: str = ""
) -> FeatureDraft:
    """A feature draft with the target's embedding and head rows (frozen in training), its decoder layer
    initialised from the target's layer `init_layer` (negative counts from the end) and its final norm."""
    config = FeatureDraftConfig.from_target(target.config, len(vocab_ids), target_name)
    draft = FeatureDraft(config)
    embedding = target.model.embed_tokens.weight.detach().float()
    with torch.no_grad():
        draft.embed.weight.copy_(embedding)
        draft.head.weight.copy_(target.get_output_embeddings().weight.detach().float()[vocab_ids])
        draft.head_ids.copy_(vocab_ids)
        if init_layer is not None:
            layer = target.model.layers[init_layer]
            for ours, theirs in _LAYER_COPY.items():
                getattr(draft, ours).weight.copy_(layer.get_submodule(theirs).weight.detach().float())
        draft.norm.weight.copy_(target.model.norm.weight.detach().float())
    return draft


def train_feature_draft(
    draft: FeatureDraft, seqs: list[dict], config: DistillConfig, steps: int, feature_noise: float
) -> dict[str, Any]:
    """Train everything but the embedding and head in place; returns timing and the final loss."""
    for p in (*draft.embed.parameters(), *draft.head.parameters()):
        p.requires_grad_(False)
    params = [p for p in draft.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    head_rows = draft.head.weight.detach()
    autocast = resolve_auto_dtype(config.train_autocast) == "bfloat16"
    targets = teacher_targets(seqs, head_rows, config.prompt_head_weight)
    generator = torch.Generator().manual_seed(config.seed)
    schedule = type(config)(**{**config.__dict__, "steps": steps})
    batches: list[list[int]] = []
    losses = []
    start = time.perf_counter()
    draft.train()
    for step in range(steps):
        if not batches:
            batches = make_batches(seqs, config.batch_tokens, generator)
        inputs, target_hidden, weight, top, probs, neg_entropy = collate(
            seqs, batches.pop(), config.prompt_weight, targets
        )
        features = shifted_features(target_hidden)
        if feature_noise > 0:
            scale = features.pow(2).mean(-1, keepdim=True).sqrt()
            noise = torch.rand(features.shape, generator=generator) * 2.0 - 1.0
            features = features + feature_noise * scale * noise
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, schedule)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = draft.hidden(inputs, features)
            loss = distill_loss(out, target_hidden, weight, head_rows, config, top, probs, neg_entropy)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            recent = sum(losses[-50:]) / len(losses[-50:])
            log.info(
                "feature draft step %d/%d loss %.4f (%.0f s)",
                step + 1,
                steps,
                recent,
                time.perf_counter() - start,
            )
    draft.eval()
    return {"train_s": time.perf_counter() - start, "final_loss": sum(losses[-50:]) / len(losses[-50:])}


def feature_agreement_by_task(draft: FeatureDraft, seqs: list[dict]) -> dict[str, Any]:
    """First-token agreement: the draft's argmax, given x_t and the target's f_{t-1}, against the target's
    greedy x_{t+1}, over response tokens (what a step's first drafted token faces)."""

    def predict(s: dict, tokens: torch.Tensor) -> torch.Tensor:
        features = shifted_features(s["hidden"].float()[None].to(draft.dtype))
        out = draft.hidden(tokens[None, :-1], features)[0, s["n_prompt"] - 1 :]
        return draft.head_ids[draft.head(out).argmax(-1)]

    return agreement_of(seqs, predict)
