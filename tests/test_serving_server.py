"""The real `mlflow models serve` on the tiny pair, on localhost: concurrent answers equal sequential ones,
every bad request is a 400 that names its field, nothing generates past the cap, and the server answers
afterwards."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

PROMPTS = ["def f(x):", "Explain KV caches.", "2 + 2 =", "Summarize: caches trade memory for time."]
CAP = 24  # max_new_tokens_cap of the served generator
MAX_PROMPTS = 3
CONTEXT = 512  # the tiny pair's max_position_embeddings (tests/tiny.py)


def bad_requests() -> list[tuple[str, list[str], dict, list[str]]]:
    """(what, prompts, params, words the 400's message must hold)."""
    one = PROMPTS[:1]
    return [
        ("huge max_new_tokens", one, {"max_new_tokens": 1_000_000_000}, ["max_new_tokens", f"1..{CAP}"]),
        ("negative max_new_tokens", one, {"max_new_tokens": -3}, ["max_new_tokens", f"1..{CAP}", "-3"]),
        ("zero max_new_tokens", one, {"max_new_tokens": 0}, ["max_new_tokens", f"1..{CAP}"]),
        ("max_new_tokens of the wrong type", one, {"max_new_tokens": "many"}, ["max_new_tokens", "integer"]),
        ("fractional max_new_tokens", one, {"max_new_tokens": 8.5}, ["max_new_tokens", "integer"]),
        ("unknown param", one, {"max_tokens": 8}, ["max_tokens", "unknown", "max_new_tokens"]),
        ("negative temperature", one, {"temperature": -1.0}, ["temperature", ">= 0"]),
        ("temperature of the wrong type", one, {"temperature": "hot"}, ["temperature", "number"]),
        ("top_p out of range", one, {"top_p": 2.0}, ["top_p", "(0, 1]"]),
        ("negative top_k", one, {"top_k": -1}, ["top_k", ">= 0"]),
        ("chat not a boolean", one, {"chat": 1}, ["chat", "true or false"]),
        ("too many prompts", PROMPTS, {}, ["prompt", f"1..{MAX_PROMPTS} prompts", str(len(PROMPTS))]),
        # the char tokenizer: one token per character (and no BOS without the chat template)
        ("prompt longer than the context", ["x" * CONTEXT], {"chat": False}, ["prompt 0", f"{CONTEXT - 1}"]),
        # room left after the prompt binds before the cap: 512 - 501 = 11 tokens
        (
            "max_new_tokens past the context left",
            ["x" * 501],
            {"chat": False, "max_new_tokens": 12},
            ["max_new_tokens", "1..11", "prompt 0"],
        ),
    ]


@pytest.mark.slow  # registers a generator, starts the real server (~20 s to load) and decodes ~40 requests
def test_served_generator_bounds_and_serialises_requests(tmp_path, tiny_pair_dir):
    from speckv.serving_registry import register_generator
    from speckv.serving_schema import GENERATOR_NAME
    from speckv.serving_server import invoke, served

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    target, draft = tiny_pair_dir
    _, version = register_generator(
        controller="fixed:3",
        target=str(target),
        draft=str(draft),
        device="cpu",
        gamma_max=4,
        max_new_tokens=12,
        max_new_tokens_cap=CAP,
        max_prompts=MAX_PROMPTS,
        uri=uri,
        artifact_location=str(tmp_path / "mlartifacts"),
    )
    env = {"MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    log = tmp_path / "server.log"
    with served(f"models:/{GENERATOR_NAME}@candidate", env=env, cwd=tmp_path, log_path=log) as url:
        params = {"max_new_tokens": CAP, "temperature": 0.0}

        def ask(prompt: str) -> dict:
            status, answer = invoke(url, [prompt], params)
            assert status == 200, answer
            return answer["predictions"][0]

        sequential = [ask(p) for p in PROMPTS]
        with ThreadPoolExecutor(4) as pool:
            concurrent = list(pool.map(ask, PROMPTS * 2))
        assert [row["text"] for row in concurrent] == [row["text"] for row in sequential] * 2
        assert all(0 < row["new_tokens"] <= CAP for row in sequential + concurrent)
        assert any(row["stop_reason"] == "length" and row["new_tokens"] == CAP for row in sequential)

        status, answer = invoke(url, PROMPTS[:MAX_PROMPTS], params)  # a batch at the bound
        assert status == 200
        assert [row["text"] for row in answer["predictions"]] == [r["text"] for r in sequential[:MAX_PROMPTS]]
        status, answer = invoke(url, ["x" * 501], {"chat": False, "max_new_tokens": 11})  # the last room
        assert status == 200 and answer["predictions"][0]["new_tokens"] <= 11

        for what, prompts, bad, words in bad_requests():
            status, answer = invoke(url, prompts, bad)
            assert status == 400, (what, status, answer)
            message = answer["message"]
            assert answer["error_code"] == "INVALID_PARAMETER_VALUE", (what, message)
            for word in words:
                assert word in message, (what, word, message)

        assert ask(PROMPTS[0])["text"] == sequential[0]["text"]  # still answering, same text

    from mlflow import MlflowClient

    registered = MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version(GENERATOR_NAME, version)
    assert registered.tags["max_new_tokens_cap"] == str(CAP) and registered.tags["max_prompts"] == str(
        MAX_PROMPTS
    )
    assert f"1..{CAP}" in registered.description and f"1..{MAX_PROMPTS} prompts" in registered.description
