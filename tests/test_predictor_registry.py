import numpy as np
import pandas as pd
import pytest
from eval_synthetic import write_costs, write_traces
from speckv.predictor.controller import load_mlp_controller
from speckv.predictor.registry import MODEL_NAME, log_training_run, promote
from speckv.predictor.runtime import load_export
from speckv.predictor.train import TrainConfig, run_training
from speckv.profiling.errors import SpeckvError


@pytest.mark.slow  # MLflow round trips
def test_register_alias_and_load(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_traces(tmp_path / "traces", seed=4, per_split=6, splits=("train", "dev", "test"))
    write_costs(tmp_path / "calibrate")
    config = TrainConfig(
        traces_dir="traces",
        calibrate_dir="calibrate",
        out_dir="out",
        export_dir="out/export",
        alpha_grid=[1.0],
        max_iter=100,
        discount_grid=[0.6, 0.8, 1.2],  # 1.0, the export's default, is not a candidate
        importance_repeats=1,
    )
    metrics = run_training(config)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    run_id, version = log_training_run(
        {"seed": 0},
        metrics,
        [tmp_path / "out" / "metrics.json"],
        tmp_path / "out" / "export",
        artifact_location=str(tmp_path / "mlartifacts"),
    )
    assert run_id and version == "1"

    import mlflow

    features = load_export("out/export").features
    X = np.random.default_rng(0).random((5, len(features)))
    pyfunc = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@candidate")
    served = pyfunc.predict(pd.DataFrame(X, columns=list(features)))
    np.testing.assert_array_equal(np.asarray(served), load_export("out/export").predict_proba(X))

    controller = load_mlp_controller(f"models:/{MODEL_NAME}@candidate", gamma_max=6, compression="int8")
    # the registered model carries the discount tuned on dev, not a default
    assert controller.discount == metrics["stop_rule"]["by_compression"]["int8"]["discount"] != 1.0

    promote(version)
    assert str(mlflow.MlflowClient().get_model_version_by_alias(MODEL_NAME, "champion").version) == "1"
    with pytest.raises(SpeckvError, match="no version 7"):
        promote(7)
    with pytest.raises(SpeckvError, match="cannot load"):
        load_mlp_controller(f"models:/{MODEL_NAME}@nope", gamma_max=6, compression="int8")
