"""MLflow tracking and registry for the predictor: one run per training, the export as a pyfunc model.

The registered model wraps the safe export (predictor/pyfunc_model.py, logged as code, so nothing is
pickled); versions move through aliases (`candidate` on registration, `champion` via `promote`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from speckv.profiling.errors import SpeckvError

MODEL_NAME = "speckv-gamma-predictor"
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
EXPORT_ARTIFACT = "export"  # the pyfunc's artifact key, and its folder inside the model's artifacts/


def tracking_uri(explicit: str | None = None) -> str:
    """An explicit URI, else $MLFLOW_TRACKING_URI, else a sqlite store in the working directory."""
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def _client(uri: str | None):
    import mlflow
    from mlflow import MlflowClient

    resolved = tracking_uri(uri)
    mlflow.set_tracking_uri(resolved)
    mlflow.set_registry_uri(resolved)
    return mlflow, MlflowClient(tracking_uri=resolved, registry_uri=resolved)


def use_experiment(mlflow, experiment: str, artifact_location: str) -> None:
    """Make `experiment` active, creating it with its artifacts under `artifact_location` if it is new."""
    if mlflow.get_experiment_by_name(experiment) is None:
        location = Path(artifact_location).resolve()
        location.mkdir(parents=True, exist_ok=True)
        mlflow.create_experiment(experiment, artifact_location=location.as_uri())
    mlflow.set_experiment(experiment)


def _flatten(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    flat = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}".replace(":", "_").replace("=", "_")
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            flat[name] = float(value)
    return flat


def log_training_run(
    params: dict[str, Any],
    metrics: dict[str, Any],
    artifacts: list[Path],
    export_dir: Path,
    *,
    uri: str | None = None,
    experiment: str = "speckv-train",
    artifact_location: str = "mlartifacts",
    register: bool = True,
    alias: str = "candidate",
) -> tuple[str, str | None]:
    """Log one training run (params, flattened metrics, files, the pyfunc model); register it under `alias`.

    Returns (run_id, registered version or None).
    """
    import pandas as pd

    mlflow, client = _client(uri)
    use_experiment(mlflow, experiment, artifact_location)

    from speckv.predictor.runtime import load_export

    predictor = load_export(export_dir)
    example = pd.DataFrame([[0.0] * len(predictor.features)], columns=list(predictor.features))
    with mlflow.start_run() as run:
        mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
        mlflow.log_metrics(_flatten(metrics))
        for path in artifacts:
            mlflow.log_artifact(str(path))
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(PYFUNC_CODE),
            artifacts={EXPORT_ARTIFACT: str(export_dir)},
            input_example=example,
            pip_requirements=["numpy", "pandas"],
        )
        run_id = run.info.run_id
    if not register:
        return run_id, None
    version = mlflow.register_model(info.model_uri, MODEL_NAME).version
    client.set_registered_model_alias(MODEL_NAME, alias, version)
    return run_id, str(version)


def promote(version: str | int, alias: str = "champion", *, uri: str | None = None) -> None:
    """Point `alias` of speckv-gamma-predictor at `version` (the evaluation stage's decision)."""
    _, client = _client(uri)
    try:
        client.get_model_version(MODEL_NAME, str(version))
    except Exception as exc:  # MLflow raises its own RestException for an unknown version
        raise SpeckvError(f"{MODEL_NAME} has no version {version}: {exc}") from exc
    client.set_registered_model_alias(MODEL_NAME, alias, str(version))


def download_export(model_uri: str, *, uri: str | None = None) -> Path:
    """The local export directory of a registered model, e.g. `models:/speckv-gamma-predictor@candidate`."""
    mlflow, _ = _client(uri)
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri))
    except Exception as exc:  # MLflow's errors for unknown names/aliases are not one type
        raise SpeckvError(f"cannot load {model_uri} from {tracking_uri(uri)}: {exc}") from exc
    export = local / "artifacts" / EXPORT_ARTIFACT
    if not export.is_dir():
        raise SpeckvError(f"{model_uri} holds no predictor export (expected artifacts/{EXPORT_ARTIFACT})")
    return export
