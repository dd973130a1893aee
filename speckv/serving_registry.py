"""Register `speckv-generator`: the served text generator as an MLflow pyfunc (the model is speckv/serving.py).

A registered version packages references, never weights: the pair (target, draft, compression, device), the
decode defaults (gamma_max, max_new_tokens, chat) and the controller spec, all in the model's `model_config`.
Models are named or given by path (`default` is a name the engine resolves when the model loads); paths are
stored absolute. A predictor given as a registry URI (`models:/speckv-gamma-predictor@candidate` or
`.../VERSION`) is pinned at registration to the version the alias names then, served as
`mlp:models:/speckv-gamma-predictor/VERSION`, and recorded in the config (`predictor`, `predictor_name`,
`predictor_alias`, `predictor_version`) and as tags of the registered version, so a generator version always
serves the predictor it was registered with, and `promote_generator` can find the version that carries a
promoted predictor. An export directory is served as `mlp:DIR`; any other controller spec (`fixed:4`,
`threshold:0.4`, `none`, ...) is served as given.

    from speckv.serving_registry import register_generator
    run_id, version = register_generator("models:/speckv-gamma-predictor@candidate", target="default")

This module also holds what the served model and its signature share: the input and output columns, the
request params and the parsing of a request's prompts.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from speckv.predictor.runtime import META_FILE
from speckv.predictor.runtime import MODELS_URI_PREFIX as MODELS_URI
from speckv.profiling.errors import SpeckvError

GENERATOR_NAME = "speckv-generator"
SERVING_CODE = Path(__file__).with_name("serving.py")  # the pyfunc model from code, loaded by MLflow by path
PROMPT = "prompt"  # the one input column
# Output columns of predict, one row per prompt, with their MLflow types.
OUTPUT_COLUMNS = {
    "text": "string",  # the generated text, special tokens skipped
    "new_tokens": "long",
    "steps": "long",  # target forwards (verify steps)
    "acceptance_rate": "double",  # accepted / drafted draft tokens (0 when nothing was drafted)
    "mean_accepted_per_step": "double",
    "tokens_per_s": "double",
    "wall_s": "double",
    "stop_reason": "string",  # eos or length
}
# Request params (`predict(..., params={...})`) with their MLflow types; defaults come from the config.
PARAM_TYPES = {
    "max_new_tokens": "long",
    "temperature": "double",
    "top_k": "long",
    "top_p": "double",
    "seed": "long",
    "chat": "boolean",
}


@dataclass
class GeneratorConfig:
    """The `model_config` of a registered generator (JSON values only)."""

    target: str = "default"
    draft: str | None = "default"
    compression: str = "fp32"
    gamma_max: int = 8
    max_new_tokens: int = 128
    chat: bool = True
    device: str | None = None  # None: CUDA when present, else CPU (decided where the model loads)
    controller: str = "fixed:4"  # the spec served: `mlp:models:/NAME/VERSION`, `mlp:DIR`, `fixed:4`, ...
    predictor: str | None = None  # the predictor reference as given (None: the controller is no `mlp:`)
    predictor_name: str | None = None  # registry name, version and alias it was pinned through
    predictor_version: str | None = None
    predictor_alias: str | None = None
    # the store of a registry predictor, used to load it when $MLFLOW_TRACKING_URI is unset
    tracking_uri: str | None = None

    @classmethod
    def from_model_config(cls, raw: dict[str, Any] | None) -> GeneratorConfig:
        raw = dict(raw or {})
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(raw) - known)
        if unknown:
            raise SpeckvError(f"{GENERATOR_NAME} model_config has unknown key(s) {unknown}")
        return cls(**raw)

    def defaults(self) -> dict[str, Any]:
        """The request params' defaults."""
        return {
            "max_new_tokens": self.max_new_tokens,
            "temperature": 0.0,
            "top_k": 0,
            "top_p": 1.0,
            "seed": 0,
            "chat": self.chat,
        }

    def tags(self) -> dict[str, str]:
        """Tags of the registered version: the predictor it pins and the pair it serves."""
        keys = ("predictor", "predictor_name", "predictor_version", "predictor_alias", "controller")
        keys += ("target", "draft", "compression", "gamma_max")
        values = asdict(self)
        return {k: str(values[k]) for k in keys if values[k] is not None}


def prompts_of(model_input: Any) -> list[str]:
    """The prompts of a request: a DataFrame with a `prompt` column, a mapping {"prompt": text or texts}, a
    list of such mappings, a text or a list of texts."""
    import pandas as pd

    if isinstance(model_input, str):
        values: list[Any] = [model_input]
    elif isinstance(model_input, pd.DataFrame):
        if PROMPT not in model_input.columns:
            raise SpeckvError(
                f"input has no {PROMPT!r} column (columns: {[str(c) for c in model_input.columns]})"
            )
        values = []
        for value in model_input[PROMPT]:  # MLflow turns {"prompt": [texts]} into one row holding the list
            values += [value] if isinstance(value, str) or not hasattr(value, "__len__") else _as_list(value)
    elif isinstance(model_input, dict):
        if PROMPT not in model_input:
            raise SpeckvError(f"input has no {PROMPT!r} key (keys: {sorted(map(str, model_input))})")
        value = model_input[PROMPT]
        values = [value] if isinstance(value, str) else list(_as_list(value))
    elif (
        isinstance(model_input, list | tuple)
        and model_input
        and all(isinstance(x, dict) for x in model_input)
    ):
        return [p for row in model_input for p in prompts_of(row)]
    elif isinstance(model_input, list | tuple):
        values = list(model_input)
    else:
        raise SpeckvError(
            f"input must be a DataFrame with a {PROMPT!r} column or {{{PROMPT!r}: text}}, "
            f"not {type(model_input).__name__}"
        )
    if not values:
        raise SpeckvError("input holds no prompt")
    for i, value in enumerate(values):
        if not isinstance(value, str):
            raise SpeckvError(f"prompt {i} is not text: {value!r}")
    return values


def _as_list(value: Any) -> list[Any]:
    if hasattr(value, "tolist"):  # numpy arrays and pandas Series from a JSON request
        value = value.tolist()
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list | tuple):
        raise SpeckvError(f"{PROMPT!r} must be a text or a list of texts, not {type(value).__name__}")
    return list(value)


def request_options(params: dict[str, Any] | None, config: GeneratorConfig) -> dict[str, Any]:
    """Decode options of one request: the config's defaults overridden by `params` (unknown keys rejected)."""
    options = config.defaults()
    unknown = sorted(set(params or {}) - set(options))
    if unknown:
        raise SpeckvError(f"unknown param(s) {unknown}; allowed: {sorted(options)}")
    for key, value in (params or {}).items():
        if value is not None:
            options[key] = _param(key, value)
    if options["max_new_tokens"] < 1:
        raise SpeckvError(f"max_new_tokens must be >= 1, got {options['max_new_tokens']}")
    return options


def _param(key: str, value: Any) -> Any:
    kind = PARAM_TYPES[key]
    if hasattr(value, "item"):  # numpy scalars from a JSON request
        value = value.item()
    if kind == "boolean" and isinstance(value, bool):
        return value
    if (
        kind == "long"
        and isinstance(value, int | float)
        and not isinstance(value, bool)
        and int(value) == value
    ):
        return int(value)
    if kind == "double" and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    expected = {"boolean": "true or false", "long": "an integer", "double": "a number"}[kind]
    raise SpeckvError(f"param {key} must be {expected}, got {value!r}")


def signature(config: GeneratorConfig):
    """The generator's MLflow signature: a `prompt` column in, OUTPUT_COLUMNS out, PARAM_TYPES as params."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    defaults = config.defaults()
    return ModelSignature(
        inputs=Schema([ColSpec("string", PROMPT)]),
        outputs=Schema([ColSpec(kind, name) for name, kind in OUTPUT_COLUMNS.items()]),
        params=ParamSchema([ParamSpec(name, kind, defaults[name]) for name, kind in PARAM_TYPES.items()]),
    )


def _absolute_uri(uri: str) -> str:
    """A sqlite store URI with an absolute path, so the generator finds its predictor from any directory."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri[len(prefix) :]).resolve())
    return uri


def _model_ref(ref: str | None) -> str | None:
    """A model given by path is stored as an absolute path; a name (`default`, a hub id) as given."""
    if ref is None:
        return None
    path = Path(ref).expanduser()
    return str(path.resolve()) if path.exists() else ref


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def resolve_predictor(ref: str, uri: str) -> dict[str, str | None]:
    """Config fields for the predictor `ref`: a registry URI pinned to its version, or an export directory."""
    if not ref.startswith(MODELS_URI):
        path = Path(ref).expanduser().resolve()
        if not (path / META_FILE).is_file():
            raise SpeckvError(f"no predictor export at {ref} (expected a directory with {META_FILE})")
        return {"controller": f"mlp:{path}", "predictor": str(path)}
    body = ref[len(MODELS_URI) :]
    name, alias, version = body, None, None
    if "@" in body:
        name, alias = body.split("@", 1)
    elif "/" in body:
        name, version = body.rsplit("/", 1)
    if not name or not (alias or (version and version.isdigit())):
        raise SpeckvError(f"predictor {ref!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    client = _client(uri)
    try:
        found = (
            client.get_model_version_by_alias(name, alias)
            if alias
            else client.get_model_version(name, version)
        )
    except Exception as exc:  # MLflow's errors for unknown names, aliases and versions are not one type
        raise SpeckvError(f"cannot resolve predictor {ref} in {uri}: {exc}") from exc
    version = str(found.version)
    return {
        "controller": f"mlp:{MODELS_URI}{name}/{version}",
        "predictor": ref,
        "predictor_name": name,
        "predictor_version": version,
        "predictor_alias": alias,
    }


def generator_config(
    predictor: str | None = None,
    *,
    controller: str | None = None,
    target: str = "default",
    draft: str | None = "default",
    compression: str = "fp32",
    gamma_max: int = 8,
    max_new_tokens: int = 128,
    chat: bool = True,
    device: str | None = None,
    uri: str | None = None,
) -> GeneratorConfig:
    """The config of a generator serving `predictor` (an `mlp:` controller) or `controller` (any spec)."""
    from speckv.predictor.registry import tracking_uri

    if controller and controller.startswith("mlp:"):
        if predictor is not None:
            raise SpeckvError("give the predictor either as `predictor` or as an `mlp:` controller, not both")
        predictor = controller.removeprefix("mlp:")
    elif predictor is not None and controller is not None:
        raise SpeckvError(f"controller {controller!r} and predictor {predictor!r}: give one of them")
    if gamma_max < 1 or max_new_tokens < 1:
        raise SpeckvError(f"gamma_max ({gamma_max}) and max_new_tokens ({max_new_tokens}) must be >= 1")
    if predictor is None and controller is None:
        raise SpeckvError(
            "give the predictor to serve (models:/speckv-gamma-predictor@candidate or an export directory) "
            "or a controller spec"
        )
    resolved = _absolute_uri(tracking_uri(uri))
    fields: dict[str, Any] = {"controller": controller}
    if predictor is not None:
        fields = resolve_predictor(predictor, resolved)
        if fields.get("predictor_name"):
            fields["tracking_uri"] = resolved
    else:
        from speckv.profiling.controllers import parse_controller

        parse_controller(fields["controller"], gamma_max, compression)  # a typo fails now, not when served
    if draft is None and fields["controller"] != "none":
        raise SpeckvError(f"controller {fields['controller']!r} drafts tokens but no draft model is given")
    return GeneratorConfig(
        target=_model_ref(target) or target,
        draft=_model_ref(draft),
        compression=compression,
        gamma_max=gamma_max,
        max_new_tokens=max_new_tokens,
        chat=chat,
        device=device,
        **fields,
    )


def register_generator(
    predictor: str | None = None,
    *,
    uri: str | None = None,
    experiment: str = "speckv-serving",
    artifact_location: str = "mlartifacts",
    register: bool = True,
    alias: str = "candidate",
    **pair: Any,
) -> tuple[str, str | None]:
    """Log speckv/serving.py as a pyfunc model from code with the config `generator_config(predictor, **pair)`
    builds (pair: controller, target, draft, compression, gamma_max, max_new_tokens, chat, device); register
    it as speckv-generator under `alias`, tagged with the predictor it pins. Nothing is loaded or copied: the
    pair and the predictor load when the model does. Returns (run_id, registered version or None)."""
    import mlflow

    from speckv.predictor.registry import tracking_uri, use_experiment

    config = generator_config(predictor, uri=uri, **pair)
    resolved = tracking_uri(uri)
    mlflow.set_tracking_uri(resolved)
    mlflow.set_registry_uri(resolved)
    use_experiment(mlflow, experiment, artifact_location)
    model_config = asdict(config)
    with mlflow.start_run(run_name=GENERATOR_NAME) as run:
        mlflow.log_params({k: str(v)[:500] for k, v in model_config.items()})
        info = mlflow.pyfunc.log_model(
            name="generator",
            python_model=str(SERVING_CODE),
            model_config=model_config,
            signature=signature(config),
            # speckv itself must be importable where the model loads (`--env-manager local`)
            pip_requirements=["mlflow", "numpy", "pandas", "torch", "transformers"],
        )
        run_id = run.info.run_id
    if not register:
        return run_id, None
    version = str(mlflow.register_model(info.model_uri, GENERATOR_NAME, tags=config.tags()).version)
    _client(resolved).set_registered_model_alias(GENERATOR_NAME, alias, version)
    return run_id, version


def promote_generator(
    predictor_version: str | int, alias: str = "champion", *, uri: str | None = None
) -> str | None:
    """Point `alias` of speckv-generator at its newest version pinning speckv-gamma-predictor
    `predictor_version`; the version, or None when no generator pins it."""
    from speckv.predictor.registry import MODEL_NAME, tracking_uri

    client = _client(tracking_uri(uri))
    try:
        versions = client.search_model_versions(f"name='{GENERATOR_NAME}'")
    except Exception:  # MLflow raises its own errors for a store without the model
        return None
    matching = [
        int(v.version)
        for v in versions
        if v.tags.get("predictor_name") == MODEL_NAME
        and v.tags.get("predictor_version") == str(predictor_version)
    ]
    if not matching:
        return None
    version = str(max(matching))
    client.set_registered_model_alias(GENERATOR_NAME, alias, version)
    return version


def tracking_env(config: GeneratorConfig) -> dict[str, str]:
    """Environment a registry predictor needs to load: the config's store when $MLFLOW_TRACKING_URI is unset."""
    if config.tracking_uri and MODELS_URI in config.controller and not os.environ.get("MLFLOW_TRACKING_URI"):
        return {"MLFLOW_TRACKING_URI": config.tracking_uri}
    return {}
