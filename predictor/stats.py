"""Paired bootstrap over prompts for tokens-per-second ratios of two policies measured on the same prompts.

A policy's rate over a set of prompts is total tokens / total time (pooled, so long generations weigh by
their length, as in serving). Resampling prompts with replacement, the same draw for both policies, keeps
the pairing: prompt difficulty cancels in the ratio and the interval reflects only the policy difference.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from speckv.profiling.errors import SpeckvError


@dataclass(frozen=True)
class RatioCI:
    ratio: float  # rate(a) / rate(b) on all prompts
    low: float
    high: float
    n: int  # paired prompts

    def as_dict(self) -> dict[str, float]:
        return {"ratio": self.ratio, "low": self.low, "high": self.high, "n": self.n}

    def __str__(self) -> str:
        return f"{self.ratio:.3f} [{self.low:.3f}, {self.high:.3f}]"


def pooled_rate(tokens: np.ndarray, seconds: np.ndarray) -> float:
    total = float(np.sum(seconds))
    return float(np.sum(tokens)) / total if total > 0 else 0.0


def paired_ratio(
    frame: pd.DataFrame,
    a: str,
    b: str,
    *,
    time_col: str,
    tokens_col: str = "new_tokens",
    units: tuple[str, ...] = ("compression", "prompt_id"),
    policy_col: str = "policy",
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> RatioCI:
    """Ratio of pooled tokens per unit time of policy `a` over policy `b`, with a paired bootstrap CI."""
    rows = frame[frame[policy_col].isin([a, b])]
    wide = rows.pivot_table(
        index=list(units), columns=policy_col, values=[tokens_col, time_col], aggfunc="sum"
    )
    if a not in rows[policy_col].values or b not in rows[policy_col].values:
        raise SpeckvError(f"cannot compare {a!r} with {b!r}: one of them has no runs")
    wide = wide.dropna()
    n = len(wide)
    if n == 0:
        raise SpeckvError(f"{a!r} and {b!r} share no prompts")
    tok_a, tok_b = wide[(tokens_col, a)].to_numpy(float), wide[(tokens_col, b)].to_numpy(float)
    t_a, t_b = wide[(time_col, a)].to_numpy(float), wide[(time_col, b)].to_numpy(float)
    point = pooled_rate(tok_a, t_a) / pooled_rate(tok_b, t_b)
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    boot = (tok_a[idx].sum(1) / t_a[idx].sum(1)) / (tok_b[idx].sum(1) / t_b[idx].sum(1))
    tail = (1.0 - level) / 2
    low, high = np.quantile(boot, [tail, 1.0 - tail])
    return RatioCI(float(point), float(low), float(high), n)


def gap_share(
    frame: pd.DataFrame,
    policy: str,
    floor: str,
    ceiling: str,
    *,
    time_col: str,
    units: tuple[str, ...] = ("compression", "prompt_id"),
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, float]:
    """(rate(policy) - rate(floor)) / (rate(ceiling) - rate(floor)): the share of the gap `policy` closes."""
    wide = frame.pivot_table(
        index=list(units), columns="policy", values=["new_tokens", time_col], aggfunc="sum"
    )
    cols = [(v, p) for v in ("new_tokens", time_col) for p in (policy, floor, ceiling)]
    missing = [p for p in (policy, floor, ceiling) if ("new_tokens", p) not in wide.columns]
    if missing:
        raise SpeckvError(f"gap share needs runs of {missing}")
    wide = wide[cols].dropna()
    tok = {p: wide[("new_tokens", p)].to_numpy(float) for p in (policy, floor, ceiling)}
    sec = {p: wide[(time_col, p)].to_numpy(float) for p in (policy, floor, ceiling)}

    def share(ix: np.ndarray | slice) -> np.ndarray:
        rate = {p: tok[p][ix].sum(-1) / sec[p][ix].sum(-1) for p in tok}
        gap = rate[ceiling] - rate[floor]
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(gap > 0, (rate[policy] - rate[floor]) / np.where(gap > 0, gap, 1.0), np.nan)

    point = float(share(slice(None)))
    idx = np.random.default_rng(seed).integers(0, len(wide), size=(n_boot, len(wide)))
    boot = share(idx)
    tail = (1.0 - level) / 2
    low, high = np.nanquantile(boot, [tail, 1.0 - tail]) if np.isfinite(boot).any() else (np.nan, np.nan)
    return {"share": point, "low": float(low), "high": float(high), "n": len(wide)}
