"""Register `speckv-generator`: the served text generator as an MLflow pyfunc (the model is speckv/serving.py).

A registered version packages references, never weights: the pair (target, draft, compression, device), the
decode defaults (gamma_max, max_new_tokens, chat), the request bounds (max_new_tokens_cap, max_prompts) and the
controller spec, all in the model's `model_config`, its signature's param defaults and its description.
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
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from speckv.predictor.runtime import META_FILE
from speckv.predictor.runtime import MODELS_URI_PREFIX as MODELS_URI
from speckv.profiling.errors import SpeckvError
from speckv.serving_schema import GENERATOR_NAME, GeneratorConfig, signature

SERVING_CODE = Path(__file__).with_name("serving.py")  # the pyfunc model from code, loaded by MLflow by path


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
    max_new_tokens_cap: int = 512,
    max_prompts: int = 8,
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
    GeneratorConfig(
        gamma_max=gamma_max,
        max_new_tokens=max_new_tokens,
        max_new_tokens_cap=max_new_tokens_cap,
        max_prompts=max_prompts,
    ).validate()
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
        max_new_tokens_cap=max_new_tokens_cap,
        max_prompts=max_prompts,
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
    builds (pair: the fields of `ServeConfig`); register it as speckv-generator under `alias`, tagged with the
    predictor it pins and its settings, described by `GeneratorConfig.description`. Nothing is loaded or
    copied: the pair and the predictor load when the model does. Returns (run_id, registered version or
    None)."""
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
    client = _client(resolved)
    client.update_model_version(GENERATOR_NAME, version, description=config.description())
    client.set_registered_model_alias(GENERATOR_NAME, alias, version)
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
