"""The speculation schedule a serving engine asks for, from measured best gammas by batch size.

vLLM takes a batch-size schedule in its `speculative_config`: `num_speculative_tokens` (the most tokens
drafted) and `num_speculative_tokens_per_batch_size`, a list of (range_start, range_end, k) with inclusive
batch-size ranges (vllm/config/speculative.py). transformers' assisted generation takes
`num_assistant_tokens` (with `num_assistant_tokens_schedule="constant"`, a fixed gamma) and
`assistant_confidence_threshold` (stop drafting below that draft confidence) for one sequence at a time.
These are exported as measured with SpecKV's own engine on the machine that ran it, not on vLLM.
"""

from __future__ import annotations

from typing import Any

from speckv.profiling.errors import SpeckvError

__all__ = ["batch_ranges", "transformers_settings", "vllm_fragment"]


def batch_ranges(best: dict[int, int]) -> list[list[int]]:
    """Inclusive (start, end, k) ranges from the best gamma at each measured batch size: a measured size's k
    holds from it up to the next measured size minus one; the largest measured size ends the last range
    (larger batches were not measured); neighbours with the same k are merged."""
    if not best or min(best) < 1 or min(best.values()) < 0:
        raise SpeckvError(f"best gammas need batch sizes >= 1 and gammas >= 0, got {best}")
    sizes = sorted(best)
    ranges: list[list[int]] = []
    for i, size in enumerate(sizes):
        end = sizes[i + 1] - 1 if i + 1 < len(sizes) else size
        if ranges and ranges[-1][2] == best[size] and ranges[-1][1] == size - 1:
            ranges[-1][1] = end
        else:
            ranges.append([size, end, best[size]])
    return ranges


def vllm_fragment(best: dict[int, int]) -> dict[str, Any] | None:
    """The `speculative_config` keys vLLM reads for a batch-size schedule; None when no measured batch size
    pays for drafting (vLLM requires num_speculative_tokens > 0: leave speculation off instead)."""
    most = max(best.values(), default=0)
    if most == 0:
        return None
    return {"num_speculative_tokens": most, "num_speculative_tokens_per_batch_size": batch_ranges(best)}


def transformers_settings(best_fixed: int, threshold: float | None) -> dict[str, Any]:
    """Generation settings for transformers' assisted generation at batch size 1: the best fixed gamma as a
    constant schedule, and the dev-tuned confidence threshold where one was tuned (transformers starts from it
    and moves it along its own ROC estimate when scikit-learn is installed); none when drafting does not pay
    (generate without an assistant)."""
    if best_fixed < 0:
        raise SpeckvError(f"best fixed gamma must be >= 0, got {best_fixed}")
    if best_fixed == 0:
        return {}
    out: dict[str, Any] = {"num_assistant_tokens": best_fixed, "num_assistant_tokens_schedule": "constant"}
    if threshold is not None:
        out["assistant_confidence_threshold"] = threshold
    return out
