"""speckv-generator: registered next to a predictor in a temporary registry, loaded by MLflow in a fresh process,
greedy text equal to the target's own; bad requests fail with a message that names the problem."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pandas as pd
import pytest
from eval_synthetic import write_mlp_export
from speckv.profiling.errors import SpeckvError

from speckv.serving_registry import GeneratorConfig, generator_config, prompts_of, request_options

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
    with pytest.raises(SpeckvError, match="max_new_tokens must be >= 1"):
        request_options({"max_new_tokens": 0}, config)


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
    from speckv.serving_registry import GENERATOR_NAME, promote_generator, register_generator

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
