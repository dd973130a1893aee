"""Gamma controllers: small objects that decide, token by token, when the draft stops and the target verifies.

The decode loop asks `start_step` for the most tokens it may draft this step, then after every drafted
token asks `keep_drafting`; after verification it reports the outcome with `observe`. Fixed gamma, the
transformers heuristic, confidence and entropy stops, the trained MLP and the hindsight oracle all speak
this protocol, so profiling, deployment and evaluation compare like with like.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from speckv.profiling import plugins
from speckv.profiling.errors import SpeckvError
from speckv.profiling.signals import TokenSignals


@dataclass(frozen=True, slots=True)
class StepContext:
    """What is known when a step starts, before anything is drafted."""

    step: int  # 0-based step index within this generation
    position: int  # tokens in the context (prompt + generated) at the start of the step
    new_tokens: int  # tokens generated so far
    prev_gamma: int  # tokens drafted in the previous step (0 on the first step)
    prev_accepted: int  # of those, how many the target accepted (0 on the first step)
    compression: str  # the target's compression, e.g. "fp32", "int8", "nf4"
    # the target's top-1 probability / entropy (nats) where it chose the last committed token (the last
    # prompt token on step 0); nan unless the controller sets needs_target_signals
    target_top1: float = float("nan")
    target_entropy: float = float("nan")
    target_recent: float = float("nan")  # mean target top-1 over the last few committed tokens


@runtime_checkable
class Controller(Protocol):
    name: str
    needs_signals: bool  # False lets the loop skip computing draft signals (fixed gamma, none)
    needs_target_signals: bool  # True: StepContext carries the target's confidence (one softmax per step)

    def reset(self) -> None:
        """Forget per-sequence state before a new generation."""

    def start_step(self, ctx: StepContext) -> int:
        """The most tokens to draft this step (0: the target decodes alone)."""

    def keep_drafting(self, signals: TokenSignals) -> bool:
        """After each drafted token that could be followed by another: draft one more?

        Only called when `needs_signals` is true; otherwise the loop drafts the whole `start_step` budget.
        """

    def submit(self, drafted: int) -> int:
        """After drafting: how many of the `drafted` tokens the target verifies (trim: fewer than drafted).

        The rest are dropped unverified: their draft forwards are paid, their verify cost is not.
        """

    def observe(self, drafted: int, accepted: int) -> None:
        """The verification outcome of the step just finished (`drafted`: the tokens submitted)."""


class _Stateless:
    needs_signals = False
    needs_target_signals = False

    def submit(self, drafted: int) -> int:
        return drafted

    def reset(self) -> None:
        pass

    def keep_drafting(self, signals: TokenSignals) -> bool:
        return True  # never consulted: needs_signals is False

    def observe(self, drafted: int, accepted: int) -> None:
        pass


class NoDraft(_Stateless):
    """The target alone, in the same loop: the fair baseline for every speedup."""

    name = "none"

    def start_step(self, ctx: StepContext) -> int:
        return 0


class FixedGamma(_Stateless):
    """Always draft `gamma` tokens (what most systems ship, usually gamma=4)."""

    def __init__(self, gamma: int) -> None:
        self.gamma = gamma
        self.name = f"fixed:{gamma}"

    def start_step(self, ctx: StepContext) -> int:
        return self.gamma


class HeuristicGamma(_Stateless):
    """transformers' "heuristic" schedule: +2 after a fully accepted draft, else -1, never below 1."""

    def __init__(self, initial: int, gamma_max: int) -> None:
        self.initial = initial
        self.gamma_max = gamma_max
        self.name = "heuristic" if initial == gamma_max else f"heuristic:{initial}"
        self.reset()

    def reset(self) -> None:
        self.current = self.initial

    def start_step(self, ctx: StepContext) -> int:
        return self.current

    def observe(self, drafted: int, accepted: int) -> None:
        if drafted == 0:
            return
        if accepted == drafted:
            self.current = min(self.current + 2, self.gamma_max)
        else:
            self.current = max(self.current - 1, 1)


class _SignalStop(_Stateless):
    """Draft up to gamma_max tokens, stopping at the first token whose signal fails `passes`.

    With `trim`, the token that failed is dropped before the verify (its draft forward is paid, its verify
    is not); without it, it is verified as in transformers' assistant_confidence_threshold.
    """

    needs_signals = True

    def __init__(self, gamma_max: int, trim: bool) -> None:
        self.gamma_max = gamma_max
        self.trim = trim
        self._failed = False

    def passes(self, signals: TokenSignals) -> bool:
        raise NotImplementedError

    def start_step(self, ctx: StepContext) -> int:
        self._failed = False
        return self.gamma_max

    def keep_drafting(self, signals: TokenSignals) -> bool:
        self._failed = not self.passes(signals)
        return not self._failed

    def submit(self, drafted: int) -> int:
        return drafted - 1 if self.trim and self._failed else drafted


class ConfidenceStop(_SignalStop):
    """Stop once a drafted token's draft probability falls below `threshold` (transformers / DISCO style)."""

    def __init__(self, threshold: float, gamma_max: int, trim: bool = False) -> None:
        super().__init__(gamma_max, trim)
        self.threshold = threshold
        self.name = f"threshold:{threshold:g}" + ("+trim" if trim else "")

    def passes(self, signals: TokenSignals) -> bool:
        return signals.draft_prob >= self.threshold


class EntropyStop(_SignalStop):
    """Stop once the draft's entropy (nats) at a drafted token exceeds `max_entropy` (AdaEDL / SVIP style)."""

    def __init__(self, max_entropy: float, gamma_max: int, trim: bool = False) -> None:
        super().__init__(gamma_max, trim)
        self.max_entropy = max_entropy
        self.name = f"entropy:{max_entropy:g}" + ("+trim" if trim else "")

    def passes(self, signals: TokenSignals) -> bool:
        return signals.entropy <= self.max_entropy


CONTROLLER_SPECS = "none | fixed:K | heuristic[:K0] | threshold:P[+trim] | entropy:H[+trim] | mlp:PATH | mlp:models:/NAME@ALIAS"


def _number(spec: str, text: str, kind: type) -> float | int:
    try:
        return kind(text)
    except ValueError:
        raise SpeckvError(f"controller {spec!r}: {text!r} is not a valid {kind.__name__}") from None


def parse_controller(spec: str, gamma_max: int, compression: str = "fp32") -> Controller:
    """Build a controller from its spec string (see CONTROLLER_SPECS)."""
    if gamma_max < 1:
        raise SpeckvError(f"gamma_max must be >= 1, got {gamma_max}")
    kind, _, arg = spec.strip().partition(":")
    trim = kind in ("threshold", "entropy") and arg.endswith("+trim")
    arg = arg.removesuffix("+trim") if trim else arg
    if kind == "none" and not arg:
        return NoDraft()
    if kind == "fixed":
        k = int(_number(spec, arg, int))
        if not 1 <= k <= gamma_max:
            raise SpeckvError(f"controller {spec!r}: K must be in 1..gamma_max ({gamma_max})")
        return FixedGamma(k)
    if kind == "heuristic":
        k0 = int(_number(spec, arg, int)) if arg else gamma_max
        if not 1 <= k0 <= gamma_max:
            raise SpeckvError(f"controller {spec!r}: K0 must be in 1..gamma_max ({gamma_max})")
        return HeuristicGamma(k0, gamma_max)
    if kind == "threshold":
        p = float(_number(spec, arg, float))
        if not 0.0 <= p <= 1.0:
            raise SpeckvError(f"controller {spec!r}: the probability threshold must be in [0, 1]")
        return ConfidenceStop(p, gamma_max, trim)
    if kind == "entropy":
        h = float(_number(spec, arg, float))
        if h < 0:
            raise SpeckvError(f"controller {spec!r}: the entropy threshold must be >= 0 nats")
        return EntropyStop(h, gamma_max, trim)
    plugin = plugins.find(plugins.CONTROLLERS, kind) if arg else None
    if (
        plugin is not None
    ):  # e.g. mlp:PATH from speckv.predictor (an entry point: the engine never imports it)
        return plugin(arg, gamma_max, compression)
    raise SpeckvError(f"unknown controller {spec!r}; expected one of: {CONTROLLER_SPECS}")


def draft_budget(controller: Controller, ctx: StepContext, gamma_max: int, tokens_left: int) -> int:
    """The step's draft budget: what the controller asks for, capped by gamma_max and by `tokens_left - 1`
    (a step always yields one target token, so drafting past that would be wasted). The decode loop and its
    model-free twin, the replay, both call this."""
    return max(0, min(controller.start_step(ctx), gamma_max, tokens_left - 1))


def submitted(controller: Controller, drafted: int) -> int:
    """How many of `drafted` tokens go to the verify: the controller's `submit`, clamped to 0..drafted."""
    return min(max(controller.submit(drafted), 0), drafted) if drafted else 0
