"""Measured cost model of one speculative step on one device and compression, as the decode loop runs it.

A step that drafts k tokens at context length L (tokens committed before it) costs
`step_ms[k] + step_ms_per_token[k] * (L - context_tokens)`: the draft forwards, the target's verify of k + 1
tokens and the loop's own bookkeeping (cache crops, commit), fitted to the loop's own timed steps
(profiling/calibrate.py, profiling/costfit.py). A step that switches between drafting and not pays
`switch_ms` more. Prefill is modelled apart, because it belongs to the time to first token: the
target's prefill of the prompt, and the draft's lazy prefill of it on the first token it drafts.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from speckv.profiling.atomic import write_text
from speckv.profiling.errors import SpeckvError


class StepCosts(list):
    """step_ms[g] (g = 0..gamma_max) of one compression at `context` cached tokens, and how it moves with the
    context: `slopes[g]` ms per context token of a g-token step, `draft_slope` of one drafted token.

    The list itself is the table at `context` (what controllers decide with); `step(g, position)` is the
    cost at any context (what replay charges). Also: the draft cost a trimmed step still pays, what
    signal-driven controllers add (`signal_ms` per drafted token whose signals they read, `target_signal_ms`
    per step), the target's prefill and the draft's lazy prefill as [intercept ms, ms per prompt token], and
    `switch` = (an idle step after a drafting one, a drafting step after an idle one): ms beyond the table.
    """

    def __init__(
        self,
        step_ms,
        draft_ms: float,
        signal_ms: float = 0.0,
        target_signal_ms: float = 0.0,
        *,
        context: float = 0.0,
        slopes=None,
        draft_slope: float = 0.0,
        prefill: tuple[float, float] = (0.0, 0.0),
        draft_prefill: tuple[float, float] = (0.0, 0.0),
        switch: tuple[float, float] = (0.0, 0.0),
    ) -> None:
        super().__init__(float(t) for t in step_ms)
        self.draft_ms = float(draft_ms)
        self.signal_ms = float(signal_ms)
        self.target_signal_ms = float(target_signal_ms)
        self.context = float(context)
        self.slopes = [0.0] * len(self) if slopes is None else [float(s) for s in slopes[: len(self)]]
        if len(self.slopes) != len(self):
            raise SpeckvError(f"{len(self.slopes)} context slopes for {len(self)} step costs")
        self.draft_slope = float(draft_slope)
        self.prefill = (float(prefill[0]), float(prefill[1]))
        self.draft_prefill = (float(draft_prefill[0]), float(draft_prefill[1]))
        self.switch = (float(switch[0]), float(switch[1]))

    def _extras(self, **changes) -> dict:
        base = {
            "context": self.context,
            "slopes": self.slopes,
            "draft_slope": self.draft_slope,
            "prefill": self.prefill,
            "draft_prefill": self.draft_prefill,
            "switch": self.switch,
        }
        return {**base, **changes}

    def step(self, gamma: int, position: float) -> float:
        """A step drafting and verifying `gamma` tokens at `position` cached tokens."""
        return self[gamma] + self.slopes[gamma] * (position - self.context)

    def draft(self, position: float) -> float:
        """One drafted token at `position` cached tokens."""
        return self.draft_ms + self.draft_slope * (position - self.context)

    def trimmed(self, drafted: int, submitted: int, position: float | None = None) -> float:
        """A step that drafted `drafted` tokens and verified `submitted` of them. Verifying none, the target
        runs alone right after the draft, as an idle step after a drafting one does: it pays `switch[0]`."""
        at = self.context if position is None else position
        alone = self.switch[0] if submitted == 0 < drafted else 0.0
        return self.step(submitted, at) + (drafted - submitted) * self.draft(at) + alone

    def target_prefill(self, tokens: int) -> float:
        """The target's prefill of `tokens` prompt tokens (0 for none)."""
        return self.prefill[0] + self.prefill[1] * tokens if tokens > 0 else 0.0

    def draft_first(self, prompt_tokens: int) -> float:
        """What the draft's first forward costs beyond an ordinary drafted token: it reads the whole prompt."""
        return max(0.0, self.draft_prefill[0] + self.draft_prefill[1] * prompt_tokens - self.draft_ms)

    def draft_lag(self, tokens: int) -> float:
        """What a drafted token costs beyond the step table when the draft has `tokens` committed tokens to
        read first: a steady run reads one or two (in the table); steps drafting nothing leave more."""
        return max(0, tokens - 2) * self.draft_prefill[1]

    def switched(self, gamma: int, previous: int) -> float:
        """What a step drafting `gamma` tokens pays beyond the table after a step that drafted `previous`
        (the draft has read the prompt: a first draft pays `draft_first` instead)."""
        if gamma == 0:
            return self.switch[0] if previous > 0 else 0.0
        return self.switch[1] if previous == 0 else 0.0

    def upto(self, gamma_max: int) -> StepCosts:
        return StepCosts(
            self[: gamma_max + 1],
            self.draft_ms,
            self.signal_ms,
            self.target_signal_ms,
            **self._extras(slopes=self.slopes[: gamma_max + 1]),
        )

    def with_signals(self, target_signals: bool) -> StepCosts:
        """The table a controller that reads every drafted token's signals (and, if `target_signals`, the
        target's confidence) pays: what the MLP's stop rule optimises."""
        per_step = self.target_signal_ms if target_signals else 0.0
        ms = [t + k * self.signal_ms + per_step for k, t in enumerate(self)]
        return StepCosts(ms, self.draft_ms + self.signal_ms, **self._extras())


@dataclass
class CostModel:
    compression: str
    device: str
    context_tokens: float  # the context length the tables below are stated at
    step_ms: list[float]  # step_ms[k]: a decode step drafting and verifying k tokens (k = 0..gamma_max)
    step_ms_per_token: list[float]  # d step_ms[k] / d context length (ms per cached token, >= 0)
    draft_ms: float  # one drafted token inside a step, at context_tokens
    draft_ms_per_token: float = 0.0  # d draft_ms / d context length
    prefill_ms: list[float] = field(default_factory=lambda: [0.0, 0.0])  # target prefill: [ms, ms/token]
    draft_prefill_ms: list[float] = field(default_factory=lambda: [0.0, 0.0])  # draft's first forward
    # beyond step_ms: [an idle step after a drafting one, a drafting step after an idle one]
    switch_ms: list[float] = field(default_factory=lambda: [0.0, 0.0])
    signal_ms: float = 0.0  # the draft's signals of one drafted token, for controllers that read them
    target_signal_ms: float = 0.0  # the target's confidence per step, for controllers that read it
    meta: dict = field(default_factory=dict)  # how it was measured (prompts, contexts, fit, versions)

    @property
    def gamma_max(self) -> int:
        return len(self.step_ms) - 1

    def step_at(self, gamma: int, context: float | None = None) -> float:
        """Modelled wall time of a decode step that drafts `gamma` tokens at `context` cached tokens."""
        if not 0 <= gamma <= self.gamma_max:
            raise ValueError(f"gamma {gamma} outside the calibrated range 0..{self.gamma_max}")
        at = self.context_tokens if context is None else context
        return self.step_ms[gamma] + self.step_ms_per_token[gamma] * (at - self.context_tokens)

    def step_costs(self, gamma_max: int | None = None) -> StepCosts:
        """The step table for 0..gamma_max drafted tokens (default: all calibrated), with its context terms."""
        top = self.gamma_max if gamma_max is None else gamma_max
        return StepCosts(
            self.step_ms[: top + 1],
            self.draft_ms,
            self.signal_ms,
            self.target_signal_ms,
            context=self.context_tokens,
            slopes=self.step_ms_per_token[: top + 1],
            draft_slope=self.draft_ms_per_token,
            prefill=tuple(self.prefill_ms),
            draft_prefill=tuple(self.draft_prefill_ms),
            switch=tuple(self.switch_ms),
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
            raise SpeckvError(
                f"cost model {path} is corrupt or from an older calibration (rerun `speckv calibrate`): {exc}"
            ) from exc
        if (
            model.draft_ms < 0
            or not model.step_ms
            or any(v <= 0 for v in model.step_ms)
            or len(model.step_ms_per_token) != len(model.step_ms)
            or len(model.switch_ms) != 2
            or min(model.switch_ms) < 0
        ):
            raise SpeckvError(f"cost model {path} holds non-positive or inconsistent timings")
        return model


def plot_cost_models(models: list[CostModel], path) -> None:
    """Modelled decode-step ms against gamma, one colour per compression: solid at the shortest measured
    context, dashed at the longest; the draft's per-token cost on the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_draft) = plt.subplots(1, 2, figsize=(9, 4), gridspec_kw={"width_ratios": [3, 1]})
    for n, model in enumerate(models):
        lo, hi = model.meta.get("fit", {}).get("contexts", [model.context_tokens] * 2)
        ks = list(range(model.gamma_max + 1))
        line = ax.plot(ks, [model.step_at(k, lo) for k in ks], marker="o", label=f"{model.compression}")[0]
        ax.plot(ks, [model.step_at(k, hi) for k in ks], ls="--", color=line.get_color())
        draft = [model.draft_ms + model.draft_ms_per_token * (c - model.context_tokens) for c in (lo, hi)]
        ax_draft.bar([n - 0.2, n + 0.2], draft, width=0.35, color=line.get_color(), alpha=0.8)
    ax.set_xlabel("tokens drafted in the step (gamma)")
    ax.set_ylabel("ms per decode step")
    ax.set_title("Step cost in the decode loop (solid: shortest context, dashed: longest)", fontsize=9)
    ax.legend(fontsize=8)
    ax.set_ylim(bottom=0)
    ax_draft.set_xticks(range(len(models)), [m.compression for m in models])
    ax_draft.set_title("draft ms per token", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
