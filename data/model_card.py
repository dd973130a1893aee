"""What the distilled draft is measured on and how it is described (step 4 of the recipe in
`data/distill.py`): held-out top-1 agreement with the target, and the model card (README.md) saved with it.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from speckv.data.distill import DistillConfig

__all__ = ["agreement_by_task", "agreement_of", "model_card", "no_bf16_note"]


def agreement_by_task(draft: Any, seqs: list[dict]) -> dict[str, Any]:
    """Top-1 agreement of the draft's full-vocab argmax with the target's greedy response tokens."""

    def predict(s: dict, tokens: torch.Tensor) -> torch.Tensor:
        return draft(input_ids=tokens[None, :-1], use_cache=False).logits[0, s["n_prompt"] - 1 :].argmax(-1)

    return agreement_of(seqs, predict)


@torch.no_grad()
def agreement_of(seqs: list[dict], predict: Callable[[dict, torch.Tensor], torch.Tensor]) -> dict[str, Any]:
    """Per task and overall, the share of response tokens that `predict(seq, tokens)` (the next token it
    chooses at each position from the prompt's last on) gets right against the target's greedy response."""
    hits: Counter[str] = Counter()
    totals: Counter[str] = Counter()
    for s in seqs:
        tokens = s["tokens"].long()
        n_resp = len(tokens) - s["n_prompt"]
        if n_resp == 0:
            continue
        hits[s["task"]] += int((predict(s, tokens) == tokens[s["n_prompt"] :]).sum())
        totals[s["task"]] += n_resp
    per_task = {t: hits[t] / totals[t] for t in sorted(totals)}
    overall = sum(hits.values()) / max(1, sum(totals.values()))
    return {"overall": overall, "per_task": per_task, "tokens": dict(totals)}


def no_bf16_note(metrics: dict[str, Any]) -> str:
    """The model cards' sentence on the `no_bf16` amounts of work, empty where they did not apply."""
    applied = metrics.get("no_bf16_applied") or {}
    if not applied:
        return ""
    amounts = ", ".join(f"{k} {v}" for k, v in sorted(applied.items()))
    return f"This CPU has no native bf16: the stage ran in float32 with the `no_bf16` amounts of work ({amounts})."


def model_card(config: DistillConfig, metrics: dict[str, Any]) -> str:
    dev, test = metrics["agreement"], metrics["agreement_test"]
    per_task = "\n".join(
        f"| {t} | {test['per_task'].get(t, float('nan')):.3f} | {test['tokens'].get(t, 0)} "
        f"| {a:.3f} | {dev['tokens'][t]} |"
        for t, a in dev["per_task"].items()
    )
    note = no_bf16_note(metrics)
    no_bf16 = f"- {note}\n" if note else ""
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
{no_bf16}- 1-token forward after a cached 64-token context (median of 40, plain transformers, no SpecKV CPU
  kernels): draft {metrics["draft_forward_ms"]:.1f} ms, target {metrics["target_forward_ms"]:.1f} ms.

Config: `{json.dumps(asdict(config))}`
"""
