"""Promotion: the registered candidate becomes `champion` only when the MLP beats best fixed on dev replay."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pandas as pd
from speckv.predictor.stats import paired_ratio

if TYPE_CHECKING:
    from speckv.predictor.evaluation.evaluate import EvaluateConfig


def alias_version(alias: str, uri: str | None) -> str | None:
    """The registered version of speckv-gamma-predictor that `alias` points at, or None."""
    from mlflow import MlflowClient
    from speckv.predictor.registry import MODEL_NAME, tracking_uri

    resolved = tracking_uri(uri)
    try:
        return str(
            MlflowClient(tracking_uri=resolved, registry_uri=resolved)
            .get_model_version_by_alias(MODEL_NAME, alias)
            .version
        )
    except Exception:  # MLflow raises its own RestException / MlflowException for a missing name or alias
        return None


def promotion(dev_frame: pd.DataFrame, config: EvaluateConfig) -> dict[str, Any]:
    """Promote the registered candidate to `champion` iff MLP / best-fixed dev replay CI lies above 1.0."""
    ci = paired_ratio(dev_frame, "mlp", "best-fixed", time_col="model_ms", **config.bootstrap)
    decision: dict[str, Any] = {"dev_ratio_vs_best_fixed": ci.as_dict(), "promoted": False, "version": None}
    if ci.low <= 1.0:
        decision["reason"] = (
            f"MLP / best fixed on dev replay = {ci}: CI not above 1.0, previous champion stays"
        )
        return decision
    if not config.promote:
        decision["reason"] = (
            f"MLP beats best fixed on dev ({ci}) but promotion is switched off (evaluate.promote)"
        )
        return decision
    from speckv.predictor.registry import MODEL_NAME, promote

    version = alias_version("candidate", config.tracking_uri)
    if version is None:
        decision["reason"] = f"MLP beats best fixed on dev ({ci}) but no {MODEL_NAME}@candidate is registered"
        return decision
    promote(version, "champion", uri=config.tracking_uri)
    decision.update(promoted=True, version=version, reason=f"MLP beats best fixed on dev replay: {ci}")
    return decision
