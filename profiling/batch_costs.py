"""Measured cost of one batched speculative step at several batch sizes, as the batched loop runs it.

At batch size B a step that runs g draft forwards and one verify of B x (g + 1) tokens costs
`step_ms[g] + step_ms_per_token[g] * (L - context_tokens)` of that batch size's CostModel, L the context
of the batch's longest row: every row's attention reads the cache up to the longest row's length
(profiling/row_cache.py), so a batch costs what its widest row makes it, not its mean. Each batch size is
calibrated like batch 1 (profiling/calibrate.py), in the batched loop itself (profiling/batch_decode.py)
at every fixed gamma, with every row decoding, on batches of different widths (`calibration_runs`).
Between calibrated batch sizes the cost is interpolated linearly in B (batches shrink as rows finish);
beyond the largest it is extrapolated along the last two. The first step of a batch (every row's first
token, after the prefills) belongs to the time to first token and is not fitted.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from speckv.profiling.atomic import write_text
from speckv.profiling.batch_decode import speculative_generate_batch
from speckv.profiling.controllers import FixedGamma
from speckv.profiling.costfit import monotone, stalled
from speckv.profiling.costmodel import CostModel, StepCosts
from speckv.profiling.errors import SpeckvError
from speckv.profiling.generation import DecodeConfig

__all__ = [
    "BatchCostModel",
    "BatchTimer",
    "batch_steps",
    "calibrate_batches",
    "calibration_runs",
    "fit_batch",
    "width_slopes",
]


@dataclass
class BatchCostModel:
    """One compression's step costs per calibrated batch size (each a batch-1-shaped CostModel)."""

    compression: str
    models: dict[int, CostModel]  # batch size -> its cost model
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.models:
            raise SpeckvError("a batch cost model needs at least one batch size")
        self.models = {int(b): m for b, m in sorted(self.models.items())}
        tops = {m.gamma_max for m in self.models.values()}
        if len(tops) != 1:
            raise SpeckvError(f"batch sizes calibrated to different gamma_max: {sorted(tops)}")

    @property
    def batch_sizes(self) -> list[int]:
        return list(self.models)

    @property
    def gamma_max(self) -> int:
        return next(iter(self.models.values())).gamma_max

    def step(self, batch: int, gamma: int, position: float) -> float:
        """Modelled ms of a step of `batch` active rows, `gamma` draft forwards, longest row context
        `position`."""
        if batch < 1:
            raise SpeckvError(f"batch size {batch} < 1")
        sizes = self.batch_sizes
        if batch in self.models or len(sizes) == 1:
            return self.models.get(batch, self.models[sizes[0]]).step_at(gamma, position)
        upper = next((i for i, b in enumerate(sizes) if b > batch), len(sizes) - 1)
        lo, hi = sizes[max(upper - 1, 0)], sizes[max(upper, 1)]
        a, b = self.models[lo].step_at(gamma, position), self.models[hi].step_at(gamma, position)
        return max(a + (b - a) * (batch - lo) / (hi - lo), 1e-6)

    def step_costs(self, batch: int) -> StepCosts:
        """The step table a controller decides with when `batch` rows decode together (the nearest
        calibrated batch size at or below it; the smallest one for a smaller batch)."""
        at = max((b for b in self.batch_sizes if b <= batch), default=self.batch_sizes[0])
        return self.models[at].step_costs()

    def save(self, path: str | Path) -> None:
        raw = {"compression": self.compression, "meta": self.meta}
        raw["models"] = {str(b): asdict(m) for b, m in self.models.items()}
        write_text(path, json.dumps(raw, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> BatchCostModel:
        path = Path(path)
        if not path.is_file():
            raise SpeckvError(f"batch cost model not found: {path}")
        try:
            raw = json.loads(path.read_text())
            models = {int(b): CostModel(**m) for b, m in raw["models"].items()}
            return cls(raw["compression"], models, raw.get("meta", {}))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise SpeckvError(f"batch cost model {path} is corrupt: {exc}") from exc


def batch_steps(result, batch: int, gamma: int) -> list[dict]:
    """The decode steps (after the first) of one fixed-gamma batched run in which every row still decoded
    (so step s is every row's step s): batch size, draft forwards, the longest row's context (the width
    every row's attention reads) and timings."""
    rows = []
    for s in range(result.steps):
        if s > 0 and result.batch_sizes[s] == batch:
            rows.append(
                {
                    "batch": batch,
                    "fixed": gamma,
                    "step": s,
                    "gamma": result.draft_forwards[s] if gamma else 0,
                    "verify_gamma": result.gammas[s],
                    "position": float(max(row.positions[s] for row in result.rows)),
                    "step_ms": 1e3 * result.step_s[s],
                    "draft_ms": 1e3 * result.draft_s[s],
                    "verify_ms": 1e3 * result.verify_s[s],
                }
            )
    return rows


def width_slopes(steps: pd.DataFrame, gamma_max: int) -> list[float]:
    """ms per token of width at each gamma 0..gamma_max, as a + b * gamma: the least-squares fit of the
    steps' time on their width within each gamma, refitted once without the steps more than four median
    absolute deviations off the first fit; never negative. Each of a step's g draft forwards attends over
    the width too, so the slope grows with gamma (one slope for all gammas overstates gamma 0's)."""
    kept = steps
    a = b = 0.0
    for _ in range(2):
        by_gamma = kept.groupby("gamma")
        x = (kept["position"] - by_gamma["position"].transform("mean")).to_numpy()
        y = (kept["step_ms"] - by_gamma["step_ms"].transform("mean")).to_numpy()
        design = np.stack([x, x * kept["gamma"].to_numpy()], axis=1)
        if not np.any(x):
            return [0.0] * (gamma_max + 1)
        (a, b), *_ = np.linalg.lstsq(design, y, rcond=None)
        residual = y - design @ np.array([a, b])
        mad = float(np.median(np.abs(residual - np.median(residual))))
        kept = kept[np.abs(residual) <= 4 * max(mad, 1e-9)]
    return [max(float(a + b * g), 0.0) for g in range(gamma_max + 1)]


def fit_batch(steps: pd.DataFrame, gamma_max: int, compression: str, device: str) -> CostModel:
    """One batch size's CostModel from its steps: a level per gamma plus a width slope per gamma
    (`width_slopes`), stalled steps left out, levels made non-decreasing; the draft's per-token cost is the
    median draft time per forward of the drafting steps."""
    if steps.empty:
        raise SpeckvError("no batched steps to fit")
    # descheduled steps are judged against their own gamma's (a longer draft is not a stall)
    keep = steps.groupby("gamma")["step_ms"].transform(lambda ms: ~stalled(ms.to_numpy()))
    steps = steps[keep.astype(bool)]
    slopes = width_slopes(steps, gamma_max)
    context = float(steps["position"].mean())
    levels = []
    for g in range(gamma_max + 1):
        mine = steps[steps["gamma"] == g]
        if mine.empty:
            raise SpeckvError(
                f"no batched step ran {g} draft forwards: calibrate with max_new_tokens > {g + 1}"
            )
        levels.append(float((mine["step_ms"] - slopes[g] * (mine["position"] - context)).mean()))
    drafting = steps[steps["gamma"] > 0]
    draft_ms = float((drafting["draft_ms"] / drafting["gamma"]).median()) if not drafting.empty else 0.0
    return CostModel(
        compression=compression,
        device=device,
        context_tokens=context,
        step_ms=monotone(levels),
        step_ms_per_token=slopes,
        draft_ms=draft_ms,
        meta={"steps": len(steps), "batch": int(steps["batch"].iloc[0])},
    )


Run = tuple[int, int, int, int]  # (batch size, fixed gamma, first prompt, prompts) of the length-sorted list


def calibration_runs(n_prompts: int, batch_sizes: list[int], gamma_max: int) -> list[Run]:
    """Every run of a batched calibration over prompts sorted by length: at each batch size B, the prompts cut
    into consecutive groups, ceil(n / B) of them and at least two, each group one batch of B rows cycling
    through it, at every fixed gamma 0..gamma_max; the gammas' order rotates from one batch size to the next
    so that load from elsewhere spreads over all. Every batch size sees every prompt, and a short group's
    batch is narrower than a long group's, so each size's width slope is fitted over a spread of widths
    (a batch cycling through all prompts would always be as wide as the longest)."""
    if n_prompts < 1 or not batch_sizes or min(batch_sizes) < 1:
        raise SpeckvError("batched calibration needs prompts and batch sizes >= 1")
    gammas = list(range(gamma_max + 1))
    runs = []
    for i, b in enumerate(batch_sizes):
        groups = min(n_prompts, max(2, -(-n_prompts // b)))
        bounds = [k * n_prompts // groups for k in range(groups + 1)]
        for g in gammas[i % len(gammas) :] + gammas[: i % len(gammas)]:
            runs += [(b, g, lo, hi - lo) for lo, hi in pairwise(bounds)]
    return runs


class BatchTimer:
    """Times calibration runs in the batched loop (warmed up once) and fits a BatchCostModel to their steps:
    all at once (`calibrate_batches`) or in blocks between other work (the live runs' own clock)."""

    def __init__(
        self, target, draft, compression: str, prompts: list[list[int]], gamma_max: int, tokens: int
    ):
        if not prompts:
            raise SpeckvError("batched calibration needs prompts")
        self.target, self.draft, self.compression = target, draft, compression
        self.prompts = sorted(prompts, key=len)  # calibration_runs' groups are of the length-sorted list
        self.gamma_max, self.tokens = gamma_max, tokens
        self.config = DecodeConfig(max_new_tokens=tokens, gamma_max=gamma_max)  # no EOS: every row runs
        self.steps: list[dict] = []
        warm = DecodeConfig(max_new_tokens=4, gamma_max=gamma_max)
        speculative_generate_batch(target, draft, prompts[:1], [FixedGamma(gamma_max)], warm, compression)

    @torch.inference_mode()
    def time(self, runs: list[Run]) -> None:
        for b, g, first, count in runs:
            rows = [self.prompts[first + i % count] for i in range(b)]
            controllers = [FixedGamma(g) for _ in rows]
            result = speculative_generate_batch(
                self.target, self.draft, rows, controllers, self.config, self.compression
            )
            self.steps += batch_steps(result, b, g)

    def model(self, batch_sizes: list[int]) -> BatchCostModel:
        frame = pd.DataFrame(self.steps)
        device = str(self.target.device)
        models = {
            b: fit_batch(frame[frame["batch"] == b], self.gamma_max, self.compression, device)
            for b in batch_sizes
        }
        meta = {"prompt_tokens": [len(p) for p in self.prompts], "max_new_tokens": self.tokens}
        meta["threads"] = torch.get_num_threads()
        return BatchCostModel(self.compression, models, meta)


def calibrate_batches(
    target,
    draft,
    compression: str,
    prompts: list[list[int]],
    batch_sizes: list[int],
    gamma_max: int,
    max_new_tokens: int,
) -> tuple[BatchCostModel, pd.DataFrame]:
    """A BatchCostModel from the batched loop's own steps at every run of `calibration_runs`, and those
    steps."""
    from tqdm import tqdm

    runs = calibration_runs(len(prompts), batch_sizes, gamma_max)
    timer = BatchTimer(target, draft, compression, prompts, gamma_max, max_new_tokens)
    for run in tqdm(runs, desc=f"batched costs {compression}", unit="run"):
        timer.time([run])
    return timer.model(batch_sizes), pd.DataFrame(timer.steps).assign(compression=compression)
