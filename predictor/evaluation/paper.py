"""The published SpecKV formulation, made runnable: gamma chosen at step start from a step-rate regressor.

The paper's MLP predicts a step's acceptance rate from aggregates of that step's own draft plus gamma and
the compression: inputs that exist only after the draft it would size. The closest deployable reading,
used here, feeds it the *previous* step's aggregates and picks the gamma with the best expected tokens per
modelled millisecond, (1 + rate(g) * g) / step_ms(g). It is refitted on train prompts at evaluation time
(the training stage scores it offline but does not export it).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from speckv.predictor.features import RUNNING, compression_one_hot
from speckv.profiling.controllers import StepContext
from speckv.profiling.signals import RunningStats, TokenSignals


def fit_paper_regressor(traces: list, seed: int):
    """The step-rate regressor of predictor.paper_regression, fitted on train traces: every position as one
    full-draft (fixed:gamma_max) step.

    Returns (fitted pipeline, mean step feature row: the input before any step has been observed).
    """
    from speckv.predictor.dataset import trace_token_frame
    from speckv.predictor.model import MLPSpec
    from speckv.predictor.paper_regression import fit_paper_regression

    tokens = trace_token_frame([t for t in traces if t.split == "train"])
    # the training stage's 16 hidden units and 500 L-BFGS iterations, L2 1e-3
    fitted, X_steps = fit_paper_regression(tokens, MLPSpec(16, 1e-3, 500, seed))
    return fitted, X_steps[:, : len(RUNNING)].mean(axis=0)


class PaperController:
    """Gamma per step from the step-rate regressor on the previous step's draft aggregates."""

    needs_signals = True  # the aggregates of each draft are collected as it is drafted
    needs_target_signals = False

    def __init__(
        self,
        regressor,
        default_aggregates: np.ndarray,
        step_ms: Sequence[float],
        gamma_max: int,
        compression: str,
    ) -> None:
        self.name = "paper"
        self.regressor = regressor
        self.default = np.asarray(default_aggregates, dtype=np.float64)
        self.step_ms = np.asarray(step_ms[: gamma_max + 1], dtype=np.float64)
        self.gamma_max = gamma_max
        self.one_hot = np.array(compression_one_hot(compression))
        self._stats = RunningStats()
        self.reset()

    def reset(self) -> None:
        self._previous = self.default
        self._current: dict[str, float] | None = None

    def start_step(self, ctx: StepContext) -> int:
        gammas = np.arange(1, self.gamma_max + 1, dtype=np.float64)
        X = np.column_stack(
            [np.tile(self._previous, (self.gamma_max, 1)), np.tile(self.one_hot, (self.gamma_max, 1)), gammas]
        )
        rate = np.clip(self.regressor.predict(X), 0.0, 1.0)
        per_ms = np.r_[1.0 / self.step_ms[0], (1.0 + rate * gammas) / self.step_ms[1:]]
        self._stats.reset()
        self._current = None
        return int(np.argmax(per_ms))

    def keep_drafting(self, signals: TokenSignals) -> bool:
        self._current = self._stats.update(signals)
        return True  # gamma was fixed at step start; this only collects the draft's aggregates

    def submit(self, drafted: int) -> int:
        return drafted

    def observe(self, drafted: int, accepted: int) -> None:
        # the loop asks about every drafted token but the budget's last: aggregates of the first k-1
        if self._current is not None:
            self._previous = np.array([self._current[c] for c in RUNNING])
