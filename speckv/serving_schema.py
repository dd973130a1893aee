"""What the served speckv-generator and its MLflow signature share: the input and output columns, the request
params and their types, the parsing of a request's prompts and the checks that bound a request before any
decoding. `GeneratorConfig` is a registered version's `model_config`; `ServeConfig` is the `serve:` section of
params.yaml, the settings the train stage registers the generator with.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from speckv.predictor.runtime import MODELS_URI_PREFIX as MODELS_URI
from speckv.profiling.errors import SpeckvError

GENERATOR_NAME = "speckv-generator"  # the registered model, named in its config's errors
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


# Where a bad param is reported, its allowed values (max_new_tokens: see `token_limit`).
PARAM_RANGES = {
    "temperature": "a number >= 0 (0: greedy)",
    "top_k": "an integer >= 0 (0: every token)",
    "top_p": "a number in (0, 1]",
    "seed": "an integer >= 0",
    "chat": "true or false",
}


@dataclass
class ServeConfig:
    """The `serve:` section of params.yaml: what the registered speckv-generator serves and how far one
    request may go. The train stage registers the generator with it (alias `candidate`)."""

    target: str = "default"  # target reference (name or path)
    draft: str | None = "default"  # draft reference; null with controller `none`
    compression: str = "fp32"  # fp32, int8 or nf4 (CUDA: fp16 too)
    controller: str = f"mlp:{MODELS_URI}speckv-gamma-predictor@candidate"  # alias pinned at registration
    gamma_max: int = 8  # most tokens drafted per step
    max_new_tokens: int = 128  # a request's default
    max_new_tokens_cap: int = 512  # the most any request may ask for (the context may allow fewer)
    max_prompts: int = 8  # the most prompts one request may hold
    chat: bool = True  # wrap prompts in the target's chat template by default
    device: str | None = None  # null: CUDA when present, else CPU (decided where the model loads)

    def __post_init__(self) -> None:
        # a bad bound fails where params.yaml is read, not after training
        bounds = ("gamma_max", "max_new_tokens", "max_new_tokens_cap", "max_prompts")
        GeneratorConfig(**{k: getattr(self, k) for k in bounds}).validate()


@dataclass
class GeneratorConfig:
    """The `model_config` of a registered generator (JSON values only)."""

    target: str = "default"
    draft: str | None = "default"
    compression: str = "fp32"
    gamma_max: int = 8
    max_new_tokens: int = 128  # a request's default
    max_new_tokens_cap: int = 512  # the most any request may ask for (the context may allow fewer)
    max_prompts: int = 8  # the most prompts one request may hold
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
        config = cls(**raw)
        config.validate()
        return config

    def validate(self) -> None:
        if self.gamma_max < 1 or self.max_prompts < 1:
            raise SpeckvError(
                f"gamma_max ({self.gamma_max}) and max_prompts ({self.max_prompts}) must be >= 1"
            )
        if not 1 <= self.max_new_tokens <= self.max_new_tokens_cap:
            raise SpeckvError(
                f"max_new_tokens ({self.max_new_tokens}) must be in "
                f"1..max_new_tokens_cap ({self.max_new_tokens_cap})"
            )

    def description(self) -> str:
        """The registered model's description: what it serves and the bounds of a request."""
        drafted = f" drafting with {self.draft}" if self.draft else ""
        return (
            f"Speculative decoding of {self.target} ({self.compression}){drafted}, "
            f"controller {self.controller}, gamma_max {self.gamma_max}. A request holds "
            f"1..{self.max_prompts} prompts; max_new_tokens (default {self.max_new_tokens}) must be in "
            f"1..{self.max_new_tokens_cap} and leave room in the model's context after the prompt. "
            "Bad requests are answered 400 naming the field."
        )

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
        keys += ("target", "draft", "compression", "gamma_max", "max_new_tokens_cap", "max_prompts")
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


def check_batch(prompts: list[str], config: GeneratorConfig) -> None:
    """A request holds at most `config.max_prompts` prompts."""
    if len(prompts) > config.max_prompts:
        raise SpeckvError(
            f"{PROMPT}: a request holds 1..{config.max_prompts} prompts on this server, got {len(prompts)}"
        )


def check_param_types(params: dict[str, Any]) -> dict[str, Any]:
    """`params` with every value of its declared type (None: the default); unknown names rejected."""
    unknown = sorted(set(params) - set(PARAM_TYPES))
    if unknown:
        raise SpeckvError(f"unknown param(s) {unknown}; allowed: {sorted(PARAM_TYPES)}")
    return {key: None if value is None else _param(key, value) for key, value in params.items()}


def request_options(params: dict[str, Any] | None, config: GeneratorConfig) -> dict[str, Any]:
    """Decode options of one request: the config's defaults overridden by `params`, each checked (unknown
    names, types, ranges, max_new_tokens against the server cap; the context is `token_limit`'s)."""
    options = config.defaults()
    for key, value in check_param_types(dict(params or {})).items():
        if value is not None:
            options[key] = value
    cap = config.max_new_tokens_cap
    if not 1 <= options["max_new_tokens"] <= cap:
        raise SpeckvError(
            f"max_new_tokens must be in 1..{cap} on this server, got {options['max_new_tokens']}"
        )
    bad = {
        "temperature": options["temperature"] < 0,
        "top_k": options["top_k"] < 0,
        "top_p": not 0.0 < options["top_p"] <= 1.0,
        "seed": not 0 <= options["seed"] < 2**63,
    }
    for key, wrong in bad.items():
        if wrong:
            raise SpeckvError(f"{key} must be {PARAM_RANGES[key]}, got {options[key]!r}")
    return options


def token_limit(
    prompt_tokens: int, context_tokens: int | None, config: GeneratorConfig, index: int = 0
) -> int:
    """The most tokens prompt `index` (`prompt_tokens` long, chat template included) may ask for: the server
    cap, and no more than the model's context (`context_tokens`, None: unbounded) holds after the prompt."""
    cap = config.max_new_tokens_cap
    if context_tokens is None:
        return cap
    room = context_tokens - prompt_tokens
    if room < 1:
        raise SpeckvError(
            f"{PROMPT} {index} is {prompt_tokens} tokens; the model's context holds {context_tokens}, so a "
            f"prompt may have at most {context_tokens - 1} tokens"
        )
    return min(cap, room)


def check_max_new_tokens(
    requested: int, limits: list[int], prompt_tokens: list[int], context_tokens: int | None
) -> None:
    """`requested` must fit every prompt's `token_limit`; the message names the prompt that binds."""
    i = min(range(len(limits)), key=limits.__getitem__)
    if requested > limits[i]:
        raise SpeckvError(
            f"max_new_tokens must be in 1..{limits[i]} for {PROMPT} {i} ({prompt_tokens[i]} tokens of the "
            f"model's {context_tokens}-token context), got {requested}"
        )


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
    expected = PARAM_RANGES.get(key, "an integer >= 1")  # max_new_tokens: its upper bound is the server's
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
