"""Draft-side signals of one drafted token, their running aggregates over the draft so far, and the target's
confidence in the tokens it committed.

Everything here is known the moment a token is drafted, before the target sees it: these are the only
inputs a gamma controller may use (the published SpecKV features used post-hoc step aggregates).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

SIGNALS = ("draft_prob", "top1_prob", "margin", "entropy")
AGGREGATES = ("min", "max", "mean")
RECENT_TOKENS = 4  # StepContext.target_recent averages the target's top-1 over this many committed tokens


@dataclass(frozen=True, slots=True)
class TokenSignals:
    """What the draft's distribution said about one drafted token."""

    draft_prob: float  # probability the draft gave the token it proposed
    top1_prob: float  # the draft's largest probability (== draft_prob when greedy)
    margin: float  # top-1 minus top-2 probability
    entropy: float  # entropy of the draft distribution, nats
    draft_index: int  # 0-based index of this token within the current draft
    position: int  # context position of the token (prompt tokens included)


def distribution_signals(probs, tokens: list[int]) -> list[tuple[float, float, float, float]]:
    """(draft_prob, top1_prob, margin, entropy) per row of a [k, V] probability tensor, one host transfer.

    Batched so that a recorder can compute a whole draft's signals after drafting, off the per-token path.
    """
    import torch  # kept local: the numpy-only MLP runtime imports this module without torch

    idx = torch.arange(len(tokens), device=probs.device)
    chosen = probs[idx, torch.tensor(tokens, device=probs.device)]
    top2 = torch.topk(probs, 2, dim=-1).values
    entropy = -(probs * torch.log(probs.clamp_min(1e-30))).sum(dim=-1)
    packed = (
        torch.stack([chosen, top2[:, 0], top2[:, 0] - top2[:, 1], entropy], dim=-1).float().cpu().tolist()
    )
    return [tuple(row) for row in packed]


def top_k_share(probs, tokens: list[int], k: int = 10) -> list[tuple[float]]:
    """Per row of a [n, V] probability tensor, the top token's probability renormalised over the top `k`:
    what llama.cpp's draft-simple speculation compares with its `p_min` (its draft sampler keeps the top 10
    tokens and softmaxes their logits, at temperature 1). `tokens` is unused: the rule reads the top token."""
    import torch

    top = torch.topk(probs, k, dim=-1).values
    return [(float(v),) for v in (top[:, 0] / top.sum(dim=-1)).cpu().tolist()]


def greedy_signals(logits) -> tuple[int, tuple[float, float, float, float]]:
    """The greedy token of one [V] logit row and its (draft_prob, top1_prob, margin, entropy), fused.

    What the decode loop computes per drafted token for a signal-reading controller: one max, one exp, two
    reductions and one host transfer (~0.1 ms on a 49k vocabulary here, against ~0.3 ms for argmax +
    softmax + distribution_signals). Equal to distribution_signals(softmax(logits)) within float rounding.
    """
    import torch

    z = logits.float()
    top, index = z.max(dim=-1)
    z = z - top  # a fresh tensor: the in-place edits below leave the caller's logits alone
    total, weighted = _exp_sums(z)
    z[index] = float("-inf")
    total, weighted, second, token = torch.stack([total, weighted, z.max(), index.float()]).cpu().tolist()
    top1, entropy = _top1_entropy(total, weighted)
    return int(token), (top1, top1, top1 - math.exp(second) / total, entropy)


def _exp_sums(z):
    """(S, W) = (sum exp z, sum exp(z) z) of a max-shifted logit row z, which it clamps in place: masked
    logits (-inf: a feature draft's restricted head) have exp z = 0, and 0 * -inf must not make a nan."""
    import torch

    e = torch.exp(z)
    return e.sum(), torch.dot(e, z.clamp_(min=torch.finfo(z.dtype).min))


def _top1_entropy(total: float, weighted: float) -> tuple[float, float]:
    """Top-1 probability 1/S and entropy log S - W/S (nats) from _exp_sums."""
    return 1.0 / total, math.log(total) - weighted / total


def target_signals(logits) -> list[tuple[float, float]]:
    """(top-1 probability, entropy in nats) of each row of the target's [k, V] logits, one host transfer.

    The target's confidence in the token it just committed comes free with the verify pass, and is known
    before the next draft starts: the step-start decision (draft at all?) may use it. Fused as
    greedy_signals (_exp_sums).
    """
    import torch

    # row by row: each row's temporaries stay in cache (batched rows ran 2-5x slower per row here)
    sums = [torch.stack(_exp_sums(row - row.max())) for row in logits.float()]
    if not sums:
        return []
    return [_top1_entropy(s, w) for s, w in torch.stack(sums).cpu().tolist()]


def recent_mean(top1, window: int):
    """target_recent at every trace position: the mean of target_top1 over positions i - window + 1 .. i,
    i.e. the target's top-1 for the last `window` committed tokens, as the decode loop's running window."""
    import numpy as np

    top1 = np.asarray(top1, dtype=np.float64)
    csum = np.concatenate([[0.0], np.cumsum(top1)])
    idx = np.arange(len(top1))
    lo = np.maximum(idx - window + 1, 0)
    return (csum[idx + 1] - csum[lo]) / (idx + 1 - lo)


class TargetConfidence:
    """The target's (top-1, entropy) where it chose the last committed token, and its mean top-1 over the
    last RECENT_TOKENS committed tokens: what a controller with `needs_target_signals` reads."""

    def __init__(self) -> None:
        self.last = (float("nan"), float("nan"))
        self.recent: deque[float] = deque(maxlen=RECENT_TOKENS)

    def see_prefill(self, logits) -> None:
        (self.last,) = target_signals(logits[None])
        self.recent.append(self.last[0])

    def see_verify(self, target_logits, accepted: int) -> None:
        # rows 0..accepted chose the tokens committed now: the accepted drafts and the next token; only the
        # last RECENT_TOKENS of them can reach the running window
        committed = target_signals(target_logits[max(0, accepted + 1 - RECENT_TOKENS) : accepted + 1])
        self.recent.extend(row[0] for row in committed)
        self.last = committed[-1]

    def recent_mean(self) -> float:
        return sum(self.recent) / len(self.recent) if self.recent else float("nan")


class RunningStats:
    """Running min/max/mean of each signal over the tokens drafted so far in this step."""

    __slots__ = ("_n", "_min", "_max", "_sum")

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._n = 0
        self._min = [float("inf")] * len(SIGNALS)
        self._max = [float("-inf")] * len(SIGNALS)
        self._sum = [0.0] * len(SIGNALS)

    def update(self, signals: TokenSignals) -> dict[str, float]:
        """Add one token; return `{f"{signal}_{agg}": value}` including this token."""
        self._n += 1
        out = {}
        for i, name in enumerate(SIGNALS):
            v = getattr(signals, name)
            self._min[i] = min(self._min[i], v)
            self._max[i] = max(self._max[i], v)
            self._sum[i] += v
            out[f"{name}_min"] = self._min[i]
            out[f"{name}_max"] = self._max[i]
            out[f"{name}_mean"] = self._sum[i] / self._n
        return out


def running_columns() -> list[str]:
    return [f"{s}_{a}" for s in SIGNALS for a in AGGREGATES]
