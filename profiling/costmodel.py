"""Measured cost model of one speculative step on one device and compression: draft ms/token, verify ms."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from speckv.profiling.atomic import write_text
from speckv.profiling.errors import SpeckvError


class StepCosts(list):
    """step_ms[g] (g = 0..gamma_max) of one compression, plus the draft cost a trimmed step still pays and
    what signal-driven controllers add: `signal_ms` per drafted token whose signals they read,
    `target_signal_ms` per step for the target's confidence."""

    def __init__(
        self, step_ms, draft_ms: float, signal_ms: float = 0.0, target_signal_ms: float = 0.0
    ) -> None:
        super().__init__(float(t) for t in step_ms)
        self.draft_ms = float(draft_ms)
        self.signal_ms = float(signal_ms)
        self.target_signal_ms = float(target_signal_ms)

    def trimmed(self, drafted: int, submitted: int) -> float:
        """A step that drafted `drafted` tokens and verified `submitted` of them."""
        return self[submitted] + (drafted - submitted) * self.draft_ms

    def upto(self, gamma_max: int) -> StepCosts:
        return StepCosts(self[: gamma_max + 1], self.draft_ms, self.signal_ms, self.target_signal_ms)

    def with_signals(self, target_signals: bool) -> StepCosts:
        """The table a controller that reads every drafted token's signals (and, if `target_signals`, the
        target's confidence) pays: what the MLP's stop rule optimises."""
        per_step = self.target_signal_ms if target_signals else 0.0
        ms = [t + k * self.signal_ms + per_step for k, t in enumerate(self)]
        return StepCosts(ms, self.draft_ms + self.signal_ms)


@dataclass
class CostModel:
    compression: str
    device: str
    draft_ms: float  # one draft forward producing one token, sampling included
    verify_ms: list[float]  # verify_ms[k]: one target forward over k drafted tokens + 1 (k = 0..gamma_max)
    overhead_ms: float = 0.0  # per-step loop overhead outside the model forwards
    signal_ms: float = 0.0  # the draft's signals of one drafted token, for controllers that read them
    target_signal_ms: float = 0.0  # the target's confidence per step, for controllers that read it
    meta: dict = field(default_factory=dict)  # how it was measured (repeats, context length, versions)

    @property
    def gamma_max(self) -> int:
        return len(self.verify_ms) - 1

    def step_ms(self, gamma: int) -> float:
        """Modelled wall time of a step that drafts `gamma` tokens and verifies them."""
        if not 0 <= gamma <= self.gamma_max:
            raise ValueError(f"gamma {gamma} outside the calibrated range 0..{self.gamma_max}")
        return gamma * self.draft_ms + self.verify_ms[gamma] + self.overhead_ms

    def step_costs(self, gamma_max: int | None = None) -> StepCosts:
        """The step_ms table for 0..gamma_max drafted tokens (default: all calibrated), with draft_ms."""
        top = self.gamma_max if gamma_max is None else gamma_max
        return StepCosts(
            [self.step_ms(k) for k in range(top + 1)], self.draft_ms, self.signal_ms, self.target_signal_ms
        )

    def save(self, path: str | Path) -> None:
        write_text(path, json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> CostModel:
        path = Path(path)
        if not path.is_file():
            raise SpeckvError(f"cost model not found: {path} (run `speckv calibrate`)")
        try:
            raw = json.loads(path.read_text())
            model = cls(**raw)
        except (json.JSONDecodeError, TypeError) as exc:
            raise SpeckvError(f"cost model {path} is corrupt: {exc}") from exc
        if model.draft_ms < 0 or not model.verify_ms or any(v <= 0 for v in model.verify_ms):
            raise SpeckvError(f"cost model {path} holds non-positive timings")
        return model
