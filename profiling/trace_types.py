"""What a dense trace holds per prompt, shared by the standalone (`traces.py`) and feature-draft
(`feature_traces.py`) tracers."""

from __future__ import annotations

from dataclasses import dataclass


def match_length(drafted: list[int], continuation: list[int]) -> int:
    """Leading drafted tokens equal to the target's continuation from the same position."""
    n = 0
    while n < len(drafted) and n < len(continuation) and drafted[n] == continuation[n]:
        n += 1
    return n


@dataclass
class DraftPath:
    """The draft's greedy gamma_max tokens and their signals at every position of a continuation."""

    draft_tokens: list[list[int]]
    match_len: list[int]
    signals: list[list[tuple[float, ...]]]  # [position][draft index] -> SIGNALS values
