"""Dense greedy traces for a feature draft (`profiling/feature_draft.py`), computed batched and exactly.

A feature draft's k-th token at a step depends on where the step starts (its first token reads the target's
feature, the later ones the draft's own predictions), so no single teacher-forced pass gives a whole draft.
But its one layer makes each cached position's key and value a function of that position's input alone, so:
  1. the target's features f at every position come with its continuation (`target_continuations`);
  2. one teacher-forced draft pass over the sequence with the true features gives every step's first token
     and, as keys/values, exactly the cache the decode loop holds at any step start;
  3. draft index d of every step is then ONE batched forward of one position per step start, attending to
     the true cache up to the step's start (a per-row mask) plus the step's own drafted positions.
That is gamma_max forwards per prompt instead of gamma_max per position. The incremental reference is in
profiling/trace_reference.py.
"""

from __future__ import annotations

import torch
from speckv.profiling.feature_draft import FeatureDraft, forward_with_features
from speckv.profiling.signals import distribution_signals
from speckv.profiling.trace_types import DraftPath, match_length
from transformers import DynamicCache


@torch.inference_mode()
def target_features(target, prompt_ids: list[int], continuation: list[int]) -> torch.Tensor:
    """The target's final hidden states at positions 0 .. L-2 of prompt + continuation (L tokens), [L-1, H]
    float32, computed as the decode loop computes them: the prompt but its last token in one forward, then
    one token per forward. (One teacher-forced forward over the whole sequence is not the same at int8/nf4:
    the quantized layers amplify its attention kernels' last-bit differences.) The reference for the
    features `target_continuations(..., features=True)` keeps."""
    seq = list(prompt_ids) + list(continuation)
    cache = DynamicCache(config=target.config)
    rows = []
    if len(prompt_ids) > 1:
        rows.append(forward_with_features(target, seq[: len(prompt_ids) - 1], cache, target.device, False)[1])
    for token in seq[len(prompt_ids) - 1 : -1]:
        rows.append(forward_with_features(target, [token], cache, target.device, False)[1])
    return torch.cat(rows).float()


@torch.inference_mode()
def feature_draft_path(
    draft: FeatureDraft,
    features: torch.Tensor,
    prompt_ids: list[int],
    continuation: list[int],
    gamma_max: int,
) -> DraftPath:
    """The draft's greedy gamma_max tokens and signals at every position of `continuation`, batched.

    `features`: the target's final hidden states at positions 0 .. L-2 of prompt + continuation (L tokens);
    a row for position L-1 may be there, it is never read.
    """
    device = draft.device
    n_prompt, n_new = len(prompt_ids), len(continuation)
    seq = list(prompt_ids) + list(continuation)
    length = len(seq)
    ids = torch.tensor([seq], device=device)
    known = features[: length - 1]
    inputs = torch.cat([known.new_zeros(1, known.shape[1]), known])[None].to(draft.dtype)  # t reads f_{t-1}
    positions = torch.arange(length, device=device)[None]
    x, q, k, v = draft.project(ids, inputs, positions)
    # steps start at positions p = n_prompt + i; their first token comes from position p - 1
    starts = torch.arange(n_prompt, n_prompt + n_new, device=device)
    causal = torch.arange(length, device=device)[None, :] < starts[:, None]  # [B, L]: cache of the step
    rows = starts - 1
    keys, values = k.expand(n_new, -1, -1, -1), v.expand(n_new, -1, -1, -1)
    x_first = x[0, rows][:, None]  # [B, 1, H]
    q_first = q[0][:, rows].transpose(0, 1)[:, :, None]  # [B, heads, 1, d]
    own = draft.finish(x_first, q_first, keys, values, causal[:, None, :])[:, 0]
    mask = causal
    tokens: list[list[int]] = [[] for _ in range(n_new)]
    signals: list[list[tuple]] = [[] for _ in range(n_new)]
    for d in range(gamma_max):
        probs = torch.softmax(draft.full_logits(own), dim=-1)
        chosen = probs.argmax(dim=-1)
        values_d = distribution_signals(probs, chosen.tolist())
        for i in range(n_new):
            tokens[i].append(int(chosen[i]))
            signals[i].append(values_d[i])
        if d + 1 == gamma_max:
            break
        # the drafted token sits at position p + d, read with the draft's own feature of the position before
        pos = (starts + d)[:, None]
        x_d, q_d, k_d, v_d = draft.project(chosen[:, None], own[:, None], pos)
        keys, values = torch.cat([keys, k_d], dim=2), torch.cat([values, v_d], dim=2)
        mask = torch.cat([mask, torch.ones(n_new, 1, dtype=torch.bool, device=device)], dim=1)
        own = draft.finish(x_d, q_d, keys, values, mask[:, None, :])[:, 0]
    match = [match_length(tokens[i], continuation[i:]) for i in range(n_new)]
    return DraftPath(tokens, match, signals)
