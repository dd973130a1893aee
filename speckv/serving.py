"""MLflow "model from code" for speckv-generator: speculative text generation served as a pyfunc.

MLflow runs this file by path when the model loads (speckv/serving_registry.py logs it; nothing is pickled).
`load_context` reads the `model_config` (pair, decode defaults, controller spec: see
`speckv.serving_registry.GeneratorConfig`), loads the pair by name or path and builds the controller with the
engine's `parse_controller` (`mlp:models:/speckv-gamma-predictor/VERSION` downloads that predictor's export
from the registry of $MLFLOW_TRACKING_URI, else of the store it was registered in).

Input: a DataFrame with a `prompt` column (one row per prompt), {"prompt": "..."}, {"prompt": ["...", ...]} or
[{"prompt": "..."}, ...]; no `prompt` is an error naming it. Params (optional, their defaults from the
config): max_new_tokens, temperature (0: greedy), top_k, top_p, seed, chat.
Output: a DataFrame, one row per prompt, with the columns
    text (str), new_tokens (int), steps (int), acceptance_rate (accepted / drafted draft tokens),
    mean_accepted_per_step, tokens_per_s, wall_s, stop_reason ("eos" or "length").
Greedy output equals the target's own (the decode loop is lossless). Requests run one at a time.

    import mlflow
    model = mlflow.pyfunc.load_model("models:/speckv-generator@candidate")
    model.predict({"prompt": "Explain KV caches."}, params={"max_new_tokens": 64})["text"][0]

Served over HTTP (speckv must be importable, hence the local environment):
    MLFLOW_TRACKING_URI=sqlite:///mlflow.db \\
        mlflow models serve -m models:/speckv-generator@candidate --env-manager local -p 5001
    curl -s localhost:5001/invocations -H 'Content-Type: application/json' \\
        -d '{"dataframe_records": [{"prompt": "Explain KV caches."}], "params": {"max_new_tokens": 64}}'
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

from speckv.api import generate, load_pair
from speckv.profiling.controllers import parse_controller
from speckv.serving_registry import OUTPUT_COLUMNS, GeneratorConfig, prompts_of, request_options, tracking_env


@contextmanager
def _environ(values: dict[str, str]):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class SpeckvGenerator(PythonModel):
    def load_context(self, context) -> None:
        self.config = GeneratorConfig.from_model_config(context.model_config)
        cfg = self.config
        self.pair = load_pair(cfg.target, cfg.draft, cfg.compression, cfg.device)
        with _environ(tracking_env(cfg)):
            self.controller = parse_controller(cfg.controller, cfg.gamma_max, cfg.compression)
        self._lock = threading.Lock()  # one pair, one controller: generations must not interleave

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        prompts = prompts_of(model_input)
        options = request_options(params, self.config)
        rows = []
        with self._lock:
            for prompt in prompts:
                out = generate(self.pair, prompt, self.controller, gamma_max=self.config.gamma_max, **options)
                summary = out.result.summary()
                rows.append({"text": out.text, **{k: summary[k] for k in OUTPUT_COLUMNS if k != "text"}})
        return pd.DataFrame(rows, columns=list(OUTPUT_COLUMNS))


mlflow.models.set_model(SpeckvGenerator())
