"""Step 3 of speculative decoding: the sampling distribution, and which drafted tokens the target accepts.

Greedy: the longest drafted prefix equal to the target's argmax. Sampling (Leviathan et al. 2023, arXiv
2211.17192, Algorithm 1): accept drafted token i with probability min(1, p_i/q_i); at the first rejection
resample from norm(max(0, p - q)), which keeps the output distribution exactly the target's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from speckv.profiling.generation import DecodeConfig


def logits_to_probs(logits: torch.Tensor, config: DecodeConfig) -> torch.Tensor:
    """The sampling distribution: temperature, then top-k, then top-p (nucleus), over the last dim."""
    logits = logits.float() / max(config.temperature, 1e-5) if not config.greedy else logits.float()
    if config.top_k > 0 and config.top_k < logits.shape[-1]:
        kth = torch.topk(logits, config.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if config.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # drop tokens once the mass before them already reaches top_p; the first token always stays
        drop_sorted = (cum - torch.softmax(sorted_logits, dim=-1)) >= config.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return torch.softmax(logits, dim=-1)


def sample(probs: torch.Tensor, generator: torch.Generator) -> int:
    return int(torch.multinomial(probs, 1, generator=generator))


def verify_greedy(drafted: list[int], target_logits: torch.Tensor) -> tuple[int, int]:
    """(accepted, next token): the longest drafted prefix matching the target's argmax, then its own token."""
    choices = target_logits.argmax(dim=-1).tolist()
    n = 0
    while n < len(drafted) and drafted[n] == choices[n]:
        n += 1
    return n, choices[n]


def verify_sampling(
    drafted: list[int],
    draft_probs: list[torch.Tensor],
    target_probs: torch.Tensor,
    generator: torch.Generator,
) -> tuple[int, int, list[float]]:
    """Leviathan et al. rejection sampling: (accepted, next token, min(1, p/q) of every drafted token)."""
    k = len(drafted)
    if k:
        idx = torch.arange(k, device=target_probs.device)
        tok = torch.tensor(drafted, device=target_probs.device)
        p = target_probs[idx, tok]
        q = torch.stack([draft_probs[i][drafted[i]] for i in range(k)])
        ratios = torch.clamp(p / q, max=1.0).tolist()
    else:
        ratios = []
    uniforms = torch.rand(k, generator=generator, device=target_probs.device).tolist() if k else []
    for i in range(k):
        if uniforms[i] >= ratios[i]:
            residual = torch.clamp(target_probs[i] - draft_probs[i], min=0.0)
            total = residual.sum()
            # p == q on the support: rejection is impossible in exact arithmetic, so sample p itself
            dist = residual / total if total > 0 else target_probs[i]
            return i, sample(dist, generator), ratios
    return k, sample(target_probs[k], generator), ratios
