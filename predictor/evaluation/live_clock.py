"""The cost model measured again beside the live runs, so that replay's clock is read in the machine's state.

The calibrate stage and the live runs are minutes apart, and a shared machine's speed drifts between them
(on the machines measured here, by up to a third). The live runs therefore carry their own calibration: the
calibrate stage's fixed-gamma runs on dev prompts (never test prompts), cut into blocks that take turns with
the test prompts' live runs, fitted exactly as `speckv calibrate` fits them. Replay under this model says how
well the cost model's form predicts the loop; replay under the calibrate stage's model (the one every
dev-tuned choice was made with) adds the drift between the two measurements. The evaluation reports both.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from speckv.profiling.calibrate import loop_config, run_order, time_runs, warm_up
from speckv.profiling.costfit import fit_cost_model
from speckv.profiling.costmodel import CostModel, StepCosts


class LiveClock:
    """Calibration runs of `prompts` (every run of calibrate.run_order) cut into `blocks` blocks; calling
    it with n times block n (past the last block: nothing)."""

    def __init__(
        self, pair, prompts: list[list[int]], gamma_max: int, max_new_tokens: int, blocks: int
    ) -> None:
        self.pair = pair
        self.prompts = prompts
        self.gamma_max = gamma_max
        self.config = loop_config(gamma_max, max_new_tokens)
        order = run_order(len(prompts), gamma_max)
        split = np.array_split(np.arange(len(order)), max(1, blocks))
        self.blocks = [[order[i] for i in idx] for idx in split if len(idx)]
        self.steps: list[dict] = []
        self.runs: list[dict] = []
        warm_up(pair.target, pair.draft, prompts[0], pair.compression, gamma_max)

    def __call__(self, n: int) -> None:
        if n < len(self.blocks):
            steps, summaries = time_runs(
                self.pair.target,
                self.pair.draft,
                self.prompts,
                self.blocks[n],
                self.pair.compression,
                self.config,
            )
            self.steps += steps
            self.runs += summaries

    def model(self, stage: StepCosts) -> CostModel:
        """The cost model of the timed blocks (the signal costs: the stage's where the blocks measured none)."""
        signals = (stage.signal_ms, stage.target_signal_ms)
        fitted = fit_cost_model(pd.DataFrame(self.steps), pd.DataFrame(self.runs), self.gamma_max, signals)
        fit = fitted.pop("fit")
        return CostModel(
            compression=self.pair.compression,
            device=str(self.pair.target.device),
            meta={
                "fit": fit,
                "prompt_tokens": [len(p) for p in self.prompts],
                "max_new_tokens": self.config.max_new_tokens,
                "loop_steps": len(self.steps),
                "runs": len(self.runs),
                "measured": "beside the live runs",
            },
            **fitted,
        )


def drift(stage: StepCosts, live: StepCosts) -> dict:
    """How the machine moved between the calibrate stage and the live runs: each gamma's step at the stage's
    reference context under the live-time model over the stage's, and the draft's per-token cost the same way."""
    ratios = [live.step(g, stage.context) / stage.step(g, stage.context) for g in range(len(stage))]
    return {
        "step_ratio": ratios,
        "step_ratio_min": min(ratios),
        "step_ratio_max": max(ratios),
        "draft_ratio": live.draft(stage.context) / stage.draft(stage.context) if stage.draft_ms > 0 else None,
    }
