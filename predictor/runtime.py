"""The deployed acceptance predictor: loads the safe export with numpy alone and drives the decode loop.

Nothing here imports scikit-learn or torch at module level: `load_export(...).predict_proba` runs on
numpy only. MLPController (the Controller protocol) reuses profiling.signals.RunningStats and
predictor.features.live_features, so live features are computed exactly as in training.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from speckv.predictor.policy import draft_cap, keep_drafting
from speckv.profiling.errors import SpeckvError

if TYPE_CHECKING:
    from speckv.profiling.controllers import StepContext
    from speckv.profiling.signals import TokenSignals

EXPORT_FORMAT = 2  # 2: a step-start model (start_* weights, meta["start"]) and trim in the stop rule
WEIGHTS_FILE = "weights.npz"
META_FILE = "model.json"
WEIGHT_NAMES = ("scaler_mean", "scaler_scale", "W1", "b1", "W2", "b2")
MODELS_URI_PREFIX = "models:/"
# Probabilities are kept this far from 0/1 so logits and log losses stay finite.
PROB_EPS = 1e-6


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -z))


def _sigmoid_scalar(z: float) -> float:
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


def apply_calibration(p: np.ndarray, calibration: dict[str, Any], arrays: dict[str, Any]) -> np.ndarray:
    """Map raw MLP probabilities through the export's calibration: none, Platt (a, b) or isotonic (x, y)."""
    kind = calibration["kind"]
    if kind == "platt":
        p = np.clip(p, PROB_EPS, 1 - PROB_EPS)
        return _sigmoid(calibration["a"] * (np.log(p) - np.log1p(-p)) + calibration["b"])
    if kind == "isotonic":
        return np.interp(p, arrays["iso_x"], arrays["iso_y"])
    return p


class AcceptancePredictor:
    """Standardise → Dense(16, relu) → Dense(1, logistic) → optional calibration; numpy only."""

    def __init__(self, weights: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        self.meta = meta
        self.features: tuple[str, ...] = tuple(meta["features"])
        self.calibration: dict[str, Any] = meta["calibration"]
        self.stop_rule: dict[str, Any] = meta["stop_rule"]
        self.mean = weights["scaler_mean"]
        self.scale = weights["scaler_scale"]
        self.W1, self.b1 = weights["W1"], weights["b1"]
        self.w2, self.b2 = weights["W2"].reshape(-1), float(weights["b2"].reshape(-1)[0])
        self.start: AcceptancePredictor | None = None  # the step-start model, set by load_export / training
        self.iso_x = weights.get("iso_x")
        self.iso_y = weights.get("iso_y")
        # The scaler folded into the first layer, for the one-row path of the decode loop.
        self._W1_folded = np.ascontiguousarray(self.W1 / self.scale[:, None])
        self._b1_folded = self.b1 - (self.mean / self.scale) @ self.W1
        self._hidden = np.empty(self.W1.shape[1])
        n = len(self.features)
        if self.mean.shape != (n,) or self.scale.shape != (n,) or self.W1.shape[0] != n:
            raise SpeckvError(f"export weights do not match its {n} features")

    def calibrate(self, p: np.ndarray) -> np.ndarray:
        return apply_calibration(p, self.calibration, {"iso_x": self.iso_x, "iso_y": self.iso_y})

    def predict_raw(self, X: np.ndarray) -> np.ndarray:
        """The MLP's acceptance probability before calibration, for (rows, features) X."""
        hidden = np.maximum(((X - self.mean) / self.scale) @ self.W1 + self.b1, 0.0)
        return _sigmoid(hidden @ self.w2 + self.b2)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Calibrated probability that each row's drafted token is accepted, given earlier ones were."""
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != len(self.features):
            raise SpeckvError(f"expected a (rows, {len(self.features)}) feature matrix, got {X.shape}")
        return self.calibrate(self.predict_raw(X))

    def predict_one(self, x: np.ndarray) -> float:
        """predict_proba of one feature vector, without allocating per call."""
        np.dot(x, self._W1_folded, out=self._hidden)
        self._hidden += self._b1_folded
        np.maximum(self._hidden, 0.0, out=self._hidden)
        p = _sigmoid_scalar(float(np.dot(self._hidden, self.w2)) + self.b2)
        kind = self.calibration["kind"]
        if kind == "platt":
            p = min(max(p, PROB_EPS), 1 - PROB_EPS)
            return _sigmoid_scalar(self.calibration["a"] * math.log(p / (1 - p)) + self.calibration["b"])
        if kind == "isotonic":
            return float(np.interp(p, self.iso_x, self.iso_y))
        return p


def load_export(path: str | Path) -> AcceptancePredictor:
    """Load an export directory written by predictor.export.write_export."""
    path = Path(path)
    meta_path, weights_path = path / META_FILE, path / WEIGHTS_FILE
    if not meta_path.is_file() or not weights_path.is_file():
        raise SpeckvError(f"no predictor export at {path}: needs {META_FILE} + {WEIGHTS_FILE} (speckv train)")
    try:
        meta = json.loads(meta_path.read_text())
        with np.load(weights_path, allow_pickle=False) as npz:
            weights = {name: npz[name].astype(np.float64) for name in npz.files}
    except (ValueError, OSError, json.JSONDecodeError) as exc:
        raise SpeckvError(f"predictor export {path} is corrupt: {exc}") from exc
    found = meta.get("format") if isinstance(meta, dict) else None
    if found != EXPORT_FORMAT:
        raise SpeckvError(f"predictor export {path}: unsupported format {found!r}, want {EXPORT_FORMAT}")
    missing = [n for n in WEIGHT_NAMES if n not in weights]
    if missing or meta.get("calibration", {}).get("kind") == "isotonic" and "iso_x" not in weights:
        raise SpeckvError(f"predictor export {path} lacks weights {missing or ['iso_x']}")
    try:
        predictor = AcceptancePredictor(weights, meta)
        predictor.start = start_predictor(predictor, weights)
    except KeyError as exc:
        raise SpeckvError(f"predictor export {path}: {META_FILE} lacks {exc}") from exc
    return predictor


START_PREFIX = "start_"  # weights of the step-start model in the same weights.npz


def start_predictor(predictor: AcceptancePredictor, weights: dict[str, np.ndarray]) -> AcceptancePredictor:
    """The step-start model (first-token acceptance before drafting) stored beside the token model."""
    meta = predictor.meta["start"]
    sub = {k.removeprefix(START_PREFIX): v for k, v in weights.items() if k.startswith(START_PREFIX)}
    return AcceptancePredictor(sub, {**meta, "stop_rule": predictor.stop_rule})


class MLPController:
    """Decisions at both ends of a draft, each maximising modelled tokens per second (predictor.policy):
    draft at all (the step-start model's first-token acceptance), draft one more (the MLP's per-token
    acceptance), and after stopping, verify fewer than drafted (trim) when the last tokens are not worth it."""

    def __init__(
        self,
        predictor: AcceptancePredictor,
        gamma_max: int,
        compression: str,
        name: str,
        share: float = 1.0,
    ) -> None:
        """`share`: the weight of a drafted token's gain against the step's cost (predictor.policy): 1 when
        the sequence decodes alone; below 1 where a batch shares every step."""
        # profiling.signals imports torch (for distribution_signals), so it is imported only here, where a
        # decode loop already has torch loaded; load_export stays numpy-only.
        from speckv.predictor.features import compression_one_hot, live_features, live_start_features
        from speckv.profiling.signals import RunningStats

        compression_one_hot(compression)  # an unknown compression fails here, not mid-generation

        rule = predictor.stop_rule
        trained_max = int(rule["gamma_max"])
        if gamma_max > trained_max:
            raise SpeckvError(
                f"{name}: gamma_max {gamma_max} exceeds the {trained_max} the predictor and its cost model "
                f"were trained with; use gamma_max <= {trained_max}"
            )
        if compression not in rule["step_ms"]:
            raise SpeckvError(
                f"{name}: no cost model for compression {compression!r} in the export "
                f"(trained on {sorted(rule['step_ms'])})"
            )
        if not 0.0 < share <= 1.0:
            raise SpeckvError(f"{name}: share must be in (0, 1], got {share}")
        self.name = name
        self.share = float(share)
        self.predictor = predictor
        self.start = predictor.start
        self.gamma_max = gamma_max
        self.compression = compression
        # the rule's knobs, tuned per compression where the export has them (the best gamma moves with it)
        knobs = {**rule, **rule.get("by_compression", {}).get(compression, {})}
        self.discount = float(knobs["discount"])
        start = knobs["start_discount"]
        self.start_discount = None if start is None else float(start)  # None: no step-start decision
        self.trim = bool(knobs["trim"])
        self.step_ms = tuple(float(t) for t in rule["step_ms"][compression][: gamma_max + 1])
        self.draft_ms = float(rule["draft_ms"][compression])
        # Signals are read only where they can change a decision: past the cap the rule stops whatever they
        # say, so the loop drafts at most `cap` tokens and never asks about the last one. A cap of 1 and no
        # step-start decision make this fixed:1, reading nothing.
        self.cap = draft_cap(self.step_ms, self.discount, self.share)
        self.needs_signals = self.cap > 1
        self.needs_target_signals = self.needs_signals or self.start_discount is not None
        self._features = live_features
        self._start_features = live_start_features
        self._stats = RunningStats()
        self._x = np.zeros(len(predictor.features))
        self._x_start = np.zeros(len(self.start.features))
        self.reset()

    def reset(self) -> None:
        self._ctx: StepContext | None = None
        self._expected = [1.0]  # E(k): expected tokens of a step verifying k drafted tokens, k = 0..

    def start_step(self, ctx: StepContext) -> int:
        if ctx.compression != self.compression:
            raise SpeckvError(f"{self.name} was loaded for {self.compression!r}, not {ctx.compression!r}")
        self._ctx = ctx
        self._stats.reset()
        self._survival = 1.0
        self._expected = [1.0]
        if self.start_discount is not None:
            # Draft at all? Before any token exists only the step-start model can say how likely the first
            # one is accepted; the same goodput rule decides, with its own tuned discount for the later ones.
            p0 = self.start.predict_one(self._start_features(ctx, self._x_start))
            if not keep_drafting(0, 1.0, 1.0, p0, self.step_ms, self.start_discount, self.share):
                return 0
        return min(self.gamma_max, self.cap)

    def keep_drafting(self, signals: TokenSignals) -> bool:
        running = self._stats.update(signals)
        p = self.predictor.predict_one(self._features(signals, running, self._ctx, self._x))
        self._survival *= p
        self._expected.append(self._expected[-1] + self._survival)
        k = len(self._expected) - 1
        return keep_drafting(
            k, self._survival, self._expected[-1], p, self.step_ms, self.discount, self.share
        )

    def submit(self, drafted: int) -> int:
        """Trim: verify the prefix with the best expected tokens per ms, the drafting already paid for.

        Only tokens the MLP has scored can be weighed; the budget's last token is never scored (the loop
        asks nothing after it), so a draft that ran to its budget is verified whole.
        """
        scored = len(self._expected) - 1
        if not self.trim or scored < drafted:
            return drafted
        sunk = drafted * self.draft_ms

        def rate(n: int) -> float:
            return self._expected[n] / (self.step_ms[n] - n * self.draft_ms + sunk)

        return max(range(drafted + 1), key=lambda n: (rate(n), n))

    def observe(self, drafted: int, accepted: int) -> None:
        pass
