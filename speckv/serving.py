"""MLflow "model from code" for speckv-generator: speculative text generation served as a pyfunc.

MLflow runs this file by path when the model loads (speckv/serving_registry.py logs it; nothing is pickled).
`load_context` reads the `model_config` (pair, decode defaults, controller spec: see
`speckv.serving_schema.GeneratorConfig`), loads the pair by name or path and builds the controller with the
engine's `parse_controller` (`mlp:models:/speckv-gamma-predictor/VERSION` downloads that predictor's export
from the registry of $MLFLOW_TRACKING_URI, else of the store it was registered in).

Input: a DataFrame with a `prompt` column (one row per prompt), {"prompt": "..."}, {"prompt": ["...", ...]} or
[{"prompt": "..."}, ...]; no `prompt` is an error naming it. Params (optional, their defaults from the
config): max_new_tokens, temperature (0: greedy), top_k, top_p, seed, chat.
Every request is checked before any decoding: at most `max_prompts` prompts; max_new_tokens in 1..the smaller
of the server cap (`max_new_tokens_cap`) and what the model's context holds after each prompt; a prompt that
leaves no room, an unknown param, a value of the wrong type or out of range: each is an MLflow
INVALID_PARAMETER_VALUE error (HTTP 400) whose message names the field and what it allows.
Output: a DataFrame, one row per prompt, with the columns
    text (str), new_tokens (int), steps (int), acceptance_rate (accepted / drafted draft tokens),
    mean_accepted_per_step, tokens_per_s, wall_s, stop_reason ("eos" or "length").
Greedy output equals the target's own (the decode loop is lossless). Requests run one at a time (one pair,
one controller per process; more processes: `mlflow models serve -w N`, docs/serving.md).

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
import mlflow.pyfunc
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModel

from speckv.api import encode_prompt, generate, load_pair
from speckv.profiling.controllers import parse_controller
from speckv.profiling.errors import SpeckvError
from speckv.serving_registry import tracking_env
from speckv.serving_schema import (
    OUTPUT_COLUMNS,
    PARAM_TYPES,
    GeneratorConfig,
    check_batch,
    check_max_new_tokens,
    check_param_types,
    prompts_of,
    request_options,
    token_limit,
)


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


def _bad_request(exc: SpeckvError) -> MlflowException:
    """An MLflow error the scoring server answers with HTTP 400 and this message (any other exception becomes
    its generic "unexpected error" 400, with the reason only in the stack trace)."""
    return MlflowException.invalid_parameter_value(str(exc))


def _strict_params() -> None:
    """Make MLflow's request-param check reject what this model cannot take, before it drops or converts it.

    MLflow (3.x) filters params against the signature before `predict` runs: a name not in it is dropped with
    a log warning, so a typo such as `max_tokens` would silently get the default length, and a wrong type gets
    a message in MLflow's terms. For this model's params (the signature's names are exactly PARAM_TYPES) the
    wrapper checks names and types first; other models' params pass through unchanged."""
    enforce = mlflow.pyfunc._enforce_params_schema
    if getattr(enforce, "speckv_strict", False):
        return

    def strict(params, schema):
        if (
            isinstance(params, dict)
            and schema is not None
            and {p.name for p in schema.params} == set(PARAM_TYPES)
        ):
            try:
                params = check_param_types(params)
            except SpeckvError as exc:
                raise _bad_request(exc) from None
        return enforce(params, schema)

    strict.speckv_strict = True
    mlflow.pyfunc._enforce_params_schema = strict


def context_tokens(pair) -> int | None:
    """Positions the pair can hold: the smaller `max_position_embeddings` of target and draft (a feature draft
    has none: it reads the target's positions)."""
    sizes = [
        getattr(getattr(model, "config", None), "max_position_embeddings", None)
        for model in (pair.target, pair.draft)
    ]
    sizes = [int(n) for n in sizes if isinstance(n, int) and n > 0]
    return min(sizes) if sizes else None


class SpeckvGenerator(PythonModel):
    def load_context(self, context) -> None:
        self.config = GeneratorConfig.from_model_config(context.model_config)
        cfg = self.config
        self.pair = load_pair(cfg.target, cfg.draft, cfg.compression, cfg.device)
        self.context_tokens = context_tokens(self.pair)
        with _environ(tracking_env(cfg)):
            self.controller = parse_controller(cfg.controller, cfg.gamma_max, cfg.compression)
        self._lock = threading.Lock()  # one pair, one controller: generations must not interleave
        _strict_params()

    def bounded_request(self, model_input, params) -> tuple[list[list[int]], dict]:
        """The request's prompts as token ids and its decode options, every bound checked; nothing decoded."""
        prompts = prompts_of(model_input)
        check_batch(prompts, self.config)
        options = request_options(params, self.config)
        ids = [encode_prompt(self.pair.tokenizer, prompt, options["chat"]) for prompt in prompts]
        lengths = [len(x) for x in ids]
        limits = [token_limit(n, self.context_tokens, self.config, i) for i, n in enumerate(lengths)]
        check_max_new_tokens(options["max_new_tokens"], limits, lengths, self.context_tokens)
        return ids, options

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        try:
            ids, options = self.bounded_request(model_input, params)
        except SpeckvError as exc:
            raise _bad_request(exc) from None
        options.pop("chat")  # the prompts are token ids now, the template applied
        rows = []
        with self._lock:
            for prompt_ids in ids:
                out = generate(
                    self.pair, prompt_ids, self.controller, gamma_max=self.config.gamma_max, **options
                )
                summary = out.result.summary()
                rows.append({"text": out.text, **{k: summary[k] for k in OUTPUT_COLUMNS if k != "text"}})
        return pd.DataFrame(rows, columns=list(OUTPUT_COLUMNS))


mlflow.models.set_model(SpeckvGenerator())
