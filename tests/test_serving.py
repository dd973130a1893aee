"""speckv-generator: registered next to a predictor in a temporary registry, loaded by MLflow in a fresh process,
greedy text equal to the target's own; bad requests fail with a message that names the problem."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
from eval_synthetic import write_mlp_export
from speckv.profiling.errors import SpeckvError

from speckv.serving_registry import generator_config
from speckv.serving_schema import (
    GeneratorConfig,
    ServeConfig,
    check_batch,
    check_max_new_tokens,
    prompts_of,
    request_options,
    token_limit,
)

PROMPTS = ["def f(x):", "Explain KV caches."]
MAX_NEW = 20


def test_prompts_of_accepts_the_documented_inputs():
    assert prompts_of({"prompt": "a"}) == ["a"]
    assert prompts_of({"prompt": ["a", "b"]}) == ["a", "b"]
    assert prompts_of(pd.DataFrame({"prompt": ["a", "b"], "id": [1, 2]})) == ["a", "b"]
    assert prompts_of([{"prompt": "a"}, {"prompt": "b"}]) == ["a", "b"]
    assert prompts_of(pd.DataFrame({"prompt": [["a", "b"]]})) == [
        "a",
        "b",
    ]  # MLflow's form of {"prompt": [..]}
    assert prompts_of("a") == ["a"]


@pytest.mark.parametrize(
    ("request_input", "message"),
    [
        ({"text": "a"}, "no 'prompt' key"),
        (pd.DataFrame({"text": ["a"]}), "no 'prompt' column"),
        ({"prompt": 3}, "must be a text or a list of texts"),
        (pd.DataFrame({"prompt": ["a", None]}), "prompt 1 is not text"),
        ([], "holds no prompt"),
        (42, "must be a DataFrame"),
    ],
)
def test_bad_input_is_a_clear_error(request_input, message):
    with pytest.raises(SpeckvError, match=message):
        prompts_of(request_input)


def test_request_options():
    config = GeneratorConfig(max_new_tokens=32, chat=False)
    assert request_options(None, config) == {
        "max_new_tokens": 32,
        "temperature": 0.0,
        "top_k": 0,
        "top_p": 1.0,
        "seed": 0,
        "chat": False,
    }
    assert request_options({"max_new_tokens": 8.0, "temperature": 1}, config)["max_new_tokens"] == 8
    with pytest.raises(SpeckvError, match="unknown param"):
        request_options({"max_tokens": 8}, config)
    with pytest.raises(SpeckvError, match="max_new_tokens must be an integer"):
        request_options({"max_new_tokens": "many"}, config)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"max_new_tokens": 0}, r"max_new_tokens must be in 1\.\.64 on this server, got 0"),
        ({"max_new_tokens": -3}, r"max_new_tokens must be in 1\.\.64 on this server, got -3"),
        ({"max_new_tokens": 10**9}, r"max_new_tokens must be in 1\.\.64 on this server, got 1000000000"),
        ({"max_new_tokens": 8.5}, r"param max_new_tokens must be an integer >= 1, got 8\.5"),
        ({"max_new_tokens": True}, "param max_new_tokens must be an integer"),
        ({"temperature": -1.0}, r"temperature must be a number >= 0 \(0: greedy\), got -1\.0"),
        ({"temperature": "hot"}, "param temperature must be a number >= 0"),
        ({"top_k": -1}, "top_k must be an integer >= 0"),
        ({"top_p": 0.0}, r"top_p must be a number in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be a number in \(0, 1\]"),
        ({"seed": -1}, "seed must be an integer >= 0"),
        ({"chat": 1}, "param chat must be true or false"),
        ({"max_tokens": 8}, r"unknown param\(s\) \['max_tokens'\]; allowed: \['chat', 'max_new_tokens'"),
    ],
)
def test_each_bad_param_is_named_with_what_it_allows(params, message):
    with pytest.raises(SpeckvError, match=message):
        request_options(params, GeneratorConfig(max_new_tokens=32, max_new_tokens_cap=64))


def test_requests_are_bounded_by_the_cap_the_context_and_the_batch_size():
    config = GeneratorConfig(max_new_tokens=32, max_new_tokens_cap=64, max_prompts=2)
    assert token_limit(10, None, config) == 64  # no known context: the cap
    assert token_limit(10, 512, config) == 64
    assert token_limit(500, 512, config) == 12  # the context after the prompt binds
    assert token_limit(511, 512, config) == 1
    with pytest.raises(
        SpeckvError, match=r"prompt 3 is 512 tokens; the model's context holds 512, .* at most 511"
    ):
        token_limit(512, 512, config, index=3)
    check_max_new_tokens(12, [64, 12], [10, 500], 512)
    with pytest.raises(
        SpeckvError, match=r"in 1\.\.12 for prompt 1 \(500 tokens of the model's 512-token context\), got 13"
    ):
        check_max_new_tokens(13, [64, 12], [10, 500], 512)
    check_batch(["a", "b"], config)
    with pytest.raises(SpeckvError, match=r"prompt: a request holds 1\.\.2 prompts on this server, got 3"):
        check_batch(["a", "b", "c"], config)


def test_serve_config_bounds_and_the_registered_description():
    from speckv.pipeline.config import ConfigError, from_dict, load_params

    raw = load_params(Path(__file__).parents[1] / "params.yaml")["serve"]
    assert set(raw) == {f.name for f in dataclasses.fields(ServeConfig)}  # every setting written out
    serve = from_dict(ServeConfig, raw, "serve")
    assert serve.max_new_tokens <= serve.max_new_tokens_cap
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(ServeConfig, {**raw, "max_tokens": 8}, "serve")
    with pytest.raises(
        SpeckvError, match=r"max_new_tokens \(600\) must be in 1\.\.max_new_tokens_cap \(512\)"
    ):
        ServeConfig(max_new_tokens=600, max_new_tokens_cap=512)
    with pytest.raises(SpeckvError, match="max_prompts"):
        ServeConfig(max_prompts=0)
    config = generator_config(controller="fixed:4", max_new_tokens=16, max_new_tokens_cap=64, max_prompts=3)
    assert "1..3 prompts" in config.description() and "1..64" in config.description()
    assert config.tags()["max_new_tokens_cap"] == "64" and config.tags()["max_prompts"] == "3"
    with pytest.raises(SpeckvError, match="unknown key"):
        GeneratorConfig.from_model_config({"max_tokens": 8})


def test_generator_config_references(tmp_path):
    export = write_mlp_export(tmp_path / "export")
    config = generator_config(str(tmp_path / "export"), target="default", uri="sqlite:///unused.db")
    assert config.controller == f"mlp:{export.resolve()}"
    assert config.predictor_version is None and config.tracking_uri is None
    assert config.target == "default"  # a name, resolved by the engine when the model loads
    with pytest.raises(SpeckvError, match="give the predictor"):
        generator_config()
    with pytest.raises(SpeckvError, match="no predictor export"):
        generator_config(str(tmp_path / "missing"))
    with pytest.raises(SpeckvError, match="models:/NAME@ALIAS or models:/NAME/VERSION"):
        generator_config("models:/speckv-gamma-predictor")
    with pytest.raises(SpeckvError, match="unknown controller"):
        generator_config(controller="fixd:4")
    assert generator_config(controller="none", draft=None).draft is None


LOAD_AND_GENERATE = textwrap.dedent(
    """
    import json, sys
    import mlflow, pandas as pd, torch
    torch.set_num_threads(1)
    prompts, max_new = json.loads(sys.argv[1])
    model = mlflow.pyfunc.load_model("models:/speckv-generator@candidate")
    one = model.predict({"prompt": prompts[0]}, params={"max_new_tokens": max_new, "temperature": 0.0})
    many = model.predict(pd.DataFrame({"prompt": prompts}), params={"max_new_tokens": max_new})
    listed = model.predict({"prompt": prompts}, params={"max_new_tokens": max_new})
    try:
        model.predict({"text": prompts[0]})
        error = None
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    print("RESULT " + json.dumps({
        "one": one.to_dict(orient="records"),
        "many": many.to_dict(orient="records"),
        "listed": listed["text"].tolist(),
        "error": error,
        "config": model.model_config,
    }))
    """
)


@pytest.mark.slow  # MLflow round trips and a second Python process (~30 s on a CPU)
def test_registered_generator_serves_lossless_text(tmp_path, monkeypatch, tiny_pair_dir):
    import mlflow
    import torch
    from speckv.predictor.registry import MODEL_NAME, log_training_run

    from speckv.api import generate, load_pair
    from speckv.serving_registry import promote_generator, register_generator
    from speckv.serving_schema import GENERATOR_NAME

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    target, draft = tiny_pair_dir
    export = write_mlp_export(tmp_path / "export")
    store = {"uri": uri, "artifact_location": str(tmp_path / "mlartifacts")}
    pair_refs = {"target": str(target), "draft": str(draft), "device": "cpu", "gamma_max": 4}

    # predictor v1 and its generator v1, then v2 and v2: each generator pins the version @candidate named then
    for expected in ("1", "2"):
        _, version = log_training_run({}, {}, [], export, **store)
        assert version == expected
        _, served = register_generator(f"models:/{MODEL_NAME}@candidate", **pair_refs, **store)
        assert served == expected
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    tags = client.get_model_version(GENERATOR_NAME, "1").tags
    assert tags["predictor_version"] == "1" and tags["predictor_alias"] == "candidate"
    assert tags["controller"] == f"mlp:models:/{MODEL_NAME}/1"
    assert str(client.get_model_version_by_alias(GENERATOR_NAME, "candidate").version) == "2"

    # evaluation promotes predictor v1: the generator serving it becomes champion
    assert promote_generator("1", uri=uri) == "1"
    assert str(client.get_model_version_by_alias(GENERATOR_NAME, "champion").version) == "1"
    assert promote_generator("9", uri=uri) is None

    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    done = subprocess.run(
        [sys.executable, "-c", LOAD_AND_GENERATE, json.dumps([PROMPTS, MAX_NEW])],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    served = json.loads(line.removeprefix("RESULT "))
    assert served["config"]["predictor_version"] == "2"
    assert served["config"]["controller"] == f"mlp:models:/{MODEL_NAME}/2"
    assert served["error"] and "prompt" in served["error"] and "missing" in served["error"].lower()

    torch.set_num_threads(1)
    pair = load_pair(str(target), str(draft), "fp32", "cpu")
    alone = [generate(pair, p, "none", max_new_tokens=MAX_NEW).text for p in PROMPTS]
    assert served["one"][0]["text"] == alone[0]
    assert [row["text"] for row in served["many"]] == served["listed"] == alone
    for row in served["many"]:
        assert set(row) >= {"text", "new_tokens", "tokens_per_s", "acceptance_rate", "stop_reason"}
        assert 0 < row["new_tokens"] <= MAX_NEW
    assert any(row["acceptance_rate"] > 0 for row in served["many"])  # the draft did draft
