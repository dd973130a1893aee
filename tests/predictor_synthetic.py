"""A small synthetic token table with the exact TOKEN_SCHEMA, for the predictor tests.

Acceptance follows sigmoid(8 * (draft_prob - 0.55)) plus noise, so a model can learn it but not perfectly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from speckv.profiling.costmodel import CostModel
from speckv.profiling.signals import RunningStats, TokenSignals

GAMMA_MAX = 8
COMPRESSIONS = ("fp32", "int8")
PROMPTS = {"train": 10, "dev": 6, "test": 6}


def draft_rows(
    rng: np.random.Generator, prompt_id: str, split: str, compression: str, steps: int
) -> list[dict]:
    rows, position, prev_gamma, prev_accepted = [], 40, 0, 0
    for step in range(steps):
        stats, first_rejection, accepted_count = RunningStats(), None, 0
        target_top1 = float(np.float32(rng.uniform(0.3, 1.0)))  # the step's context: one value per step
        for i in range(GAMMA_MAX):
            draft_prob = float(np.float32(rng.beta(2.0, 1.2)))
            top1 = float(np.float32(max(draft_prob, rng.uniform(0.3, 1.0))))
            margin = float(np.float32(top1 * rng.uniform(0.1, 0.9)))
            entropy = float(np.float32(max(0.0, 2.5 * (1 - draft_prob) + rng.normal(0, 0.2))))
            signals = TokenSignals(draft_prob, top1, margin, entropy, i, position + i)
            running = stats.update(signals)
            accepted = bool(rng.random() < 1 / (1 + np.exp(-8 * (draft_prob - 0.55))))
            labelled = first_rejection is None
            if labelled and not accepted:
                first_rejection = i
            accepted_count += labelled and accepted
            rows.append(
                {
                    "prompt_id": prompt_id,
                    "task": "qa" if prompt_id.endswith(("0", "2", "4")) else "code",
                    "split": split,
                    "compression": compression,
                    "controller": f"fixed:{GAMMA_MAX}",
                    "mode": "greedy",
                    "step": step,
                    "draft_index": i,
                    "gamma": GAMMA_MAX,
                    "position": position + i,
                    "new_index": position + i - 40,
                    "draft_prob": draft_prob,
                    "top1_prob": top1,
                    "margin": margin,
                    "entropy": entropy,
                    **running,
                    "prev_gamma": prev_gamma,
                    "prev_accepted": prev_accepted,
                    "target_top1": target_top1,
                    "target_entropy": float(np.float32(2.0 * (1 - target_top1))),
                    "target_recent": float(np.float32((target_top1 + 0.7) / 2)),
                    "accepted": accepted,
                    "labelled": labelled,
                    "accept_prob": None,
                    "draft_ms": 2.0,
                }
            )
        position += accepted_count + 1
        prev_gamma, prev_accepted = GAMMA_MAX, accepted_count
    return rows


def token_frame(seed: int = 0, steps: int = 10) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for split, n in PROMPTS.items():
        for j in range(n):
            for compression in COMPRESSIONS:
                rows += draft_rows(rng, f"{split}-{j}", split, compression, steps)
    return pd.DataFrame(rows)


def write_costs(path: Path) -> Path:
    for i, compression in enumerate(COMPRESSIONS):
        draft = 1.5 + i
        steps = [12.0 + 3 * i + (0.8 + draft) * k for k in range(GAMMA_MAX + 1)]
        CostModel(compression, "cpu", 50.0, steps, [0.0] * (GAMMA_MAX + 1), draft_ms=draft).save(
            path / f"{compression}.json"
        )
    return path
