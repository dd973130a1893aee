"""What one generation is asked for and what it returns: the decode settings, the tokens with their per-step
statistics and timings, and the per-step outcome a recorder receives."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from speckv.profiling.controllers import StepContext
from speckv.profiling.errors import SpeckvError
from speckv.profiling.signals import TokenSignals

# DecodeConfig's fields that the command line and the stage configs set (EOS tokens come with the pair)
SETTINGS = ("max_new_tokens", "gamma_max", "temperature", "top_k", "top_p", "seed")


@dataclass(frozen=True)
class DecodeConfig:
    max_new_tokens: int = 128  # generated tokens, EOS included
    gamma_max: int = 8  # hard cap on tokens drafted per step, whatever the controller says
    temperature: float = 0.0  # 0 is greedy
    top_k: int = 0  # 0 keeps every token
    top_p: float = 1.0  # 1.0 keeps every token
    seed: int = 0  # seeds the sampling generator (unused when greedy)
    eos_token_ids: tuple[int, ...] = ()  # generation stops after any of these

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @classmethod
    def checked_from(cls, settings: Any, **extra: Any) -> DecodeConfig:
        """The decode settings that `settings` (command-line arguments, a stage config) holds under these
        fields' names, plus `extra` (e.g. the pair's EOS tokens), validated."""
        config = cls(**{name: getattr(settings, name) for name in SETTINGS}, **extra)
        config.validate()
        return config

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise SpeckvError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.gamma_max < 1:
            raise SpeckvError(f"gamma_max must be >= 1, got {self.gamma_max}")
        if self.temperature < 0:
            raise SpeckvError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise SpeckvError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise SpeckvError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class StepOutcome:
    """Everything one step produced, handed to a recorder (built only when a recorder is attached)."""

    ctx: StepContext
    signals: list[TokenSignals]  # one per drafted token
    draft_ms: list[float]  # one per drafted token
    accepted: int  # drafted tokens the target accepted
    accept_probs: list[float] | None  # min(1, p/q) per drafted token (sampling only)
    target_token: int  # correction or bonus token
    produced: int  # tokens appended after EOS / max_new_tokens truncation
    verify_ms: float


class Recorder(Protocol):
    def record_step(self, outcome: StepOutcome) -> None: ...


@dataclass
class GenerationResult:
    """Tokens, per-step statistics and timings of one generation.

    Timings chain without gaps: wall_s = prefill_s + sum(step_s). The first token is committed at
    the end of step 0, so time to first token covers both models' prompt prefill (the target's before step
    0, the draft's lazily on the first token it drafts) and the decode phase is every later step: what a
    gamma controller controls.
    """

    token_ids: list[int]  # generated tokens only
    gammas: list[int] = field(default_factory=list)  # drafted per step
    accepts: list[int] = field(default_factory=list)  # accepted per step
    produced: list[int] = field(default_factory=list)  # tokens committed per step (after EOS/length cuts)
    positions: list[int] = field(default_factory=list)  # context length at each step's start
    step_s: list[float] = field(default_factory=list)  # wall time of each step: draft, verify, commit
    draft_s: list[float] = field(
        default_factory=list
    )  # per step, up to the verify: controller and draft forwards
    verify_s: list[float] = field(default_factory=list)  # per step: the target's verify forward
    prefill_s: float = (
        0.0  # up to step 0: cache set-up and the target's prefill (all prompt tokens but the last)
    )
    wall_s: float = 0.0
    stop_reason: str = "length"  # "eos" or "length"

    @property
    def new_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def steps(self) -> int:
        return len(self.gammas)

    @property
    def drafted(self) -> int:
        return sum(self.gammas)

    @property
    def accepted(self) -> int:
        return sum(self.accepts)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted_per_step(self) -> float:
        return self.accepted / self.steps if self.steps else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def decode_s(self) -> float:
        """Wall time after the first token: every step but the first."""
        return float(sum(self.step_s[1:]))

    @property
    def ttft_s(self) -> float:
        return self.wall_s - self.decode_s

    @property
    def decode_tokens(self) -> int:
        return self.new_tokens - (self.produced[0] if self.produced else 0)

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0

    def summary(self) -> dict:
        return {
            "new_tokens": self.new_tokens,
            "steps": self.steps,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "acceptance_rate": self.acceptance_rate,
            "mean_accepted_per_step": self.mean_accepted_per_step,
            "wall_s": self.wall_s,
            "tokens_per_s": self.tokens_per_s,
            "ttft_s": self.ttft_s,
            "decode_tokens": self.decode_tokens,
            "decode_s": self.decode_s,
            "decode_tokens_per_s": self.decode_tokens_per_s,
            "stop_reason": self.stop_reason,
        }
