"""MLflow "model from code" for speckv-gamma-predictor: loaded by MLflow, never imported by the pipeline.

predict takes a DataFrame with the export's feature columns and returns acceptance probabilities.
"""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel
from speckv.predictor.runtime import load_export
from speckv.profiling.errors import SpeckvError


class GammaPredictorModel(PythonModel):
    def load_context(self, context) -> None:
        self.predictor = load_export(context.artifacts["export"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> np.ndarray:
        missing = [f for f in self.predictor.features if f not in model_input.columns]
        if missing:
            raise SpeckvError(f"input lacks feature column(s) {missing}")
        X = model_input[list(self.predictor.features)].to_numpy(np.float64)
        return self.predictor.predict_proba(X)


mlflow.models.set_model(GammaPredictorModel())
