"""`speckv generate`: JSON output on a tiny pair, and one clear error with a non-zero exit for bad input."""

from __future__ import annotations

import json

import pytest
from speckv.pipeline.cli import main
from tiny import save_pair


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse rejects bad choices itself
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def generate(capsys, pair_dir, *argv: str) -> tuple[int, str, str]:
    """`speckv generate` on the pair in `pair_dir` with the other arguments `argv`."""
    target, draft = pair_dir
    return run_cli(capsys, "generate", "--target", str(target), "--draft", str(draft), *argv)


def test_generate_json(tiny_pair_dir, capsys):
    argv = ["--prompt", "def f(x):", "--controller", "fixed:4", "--max-new-tokens", "12", "--json"]
    code, out, _ = generate(capsys, tiny_pair_dir, *argv, "--device", "cpu")
    assert code == 0
    payload = json.loads(out)
    for key in [
        "text",
        "token_ids",
        "new_tokens",
        "steps",
        "drafted",
        "accepted",
        "acceptance_rate",
        "mean_accepted_per_step",
        "wall_s",
        "tokens_per_s",
        "controller",
        "compression",
    ]:
        assert key in payload
    assert payload["new_tokens"] == len(payload["token_ids"]) == 12
    assert payload["controller"] == "fixed:4"


def test_generate_chat_and_prompt_file(tiny_pair_dir, capsys, tmp_path):
    prompt = tmp_path / "p.txt"
    prompt.write_text("hello there")
    argv = ["--prompt-file", str(prompt), "--chat", "--max-new-tokens", "5", "--json"]
    code, out, _ = generate(capsys, tiny_pair_dir, *argv)
    assert code == 0 and json.loads(out)["new_tokens"] == 5


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--controller", "fixed:99"], "gamma_max"),
        (["--controller", "bogus"], "unknown controller"),
        (["--controller", "threshold:abc"], "not a valid float"),
        (["--gamma-max", "0"], "gamma_max"),
        (["--temperature", "-1"], "temperature"),
        (["--top-p", "0"], "top_p"),
        (["--max-new-tokens", "0"], "max_new_tokens"),
        (["--prompt", "  "], "empty"),
    ],
)
def test_bad_arguments_fail_clearly(tiny_pair_dir, capsys, extra, message):
    code, _, err = generate(capsys, tiny_pair_dir, "--prompt", "x", *extra)
    assert code == 2
    assert message in err and err.count("error") == 1


def test_missing_inputs_fail_clearly(tiny_pair_dir, capsys, tmp_path):
    target, draft = tiny_pair_dir
    cases = [
        (["--target", str(tmp_path / "nope"), "--draft", str(draft), "--prompt", "x"], "not found"),
        (
            ["--target", str(target), "--draft", str(draft), "--prompt-file", str(tmp_path / "no.txt")],
            "not found",
        ),
        (["--target", str(tmp_path), "--draft", str(draft), "--prompt", "x"], "no config.json"),
        (["--target", str(target), "--prompt", "x"], "needs --draft"),
        (
            ["--target", str(target), "--draft", str(draft), "--prompt", "x", "--compression", "int3"],
            "invalid choice",
        ),
    ]
    for argv, message in cases:
        code, _, err = run_cli(capsys, "generate", *argv)
        assert code == 2, argv
        assert message in err, (argv, err)


def test_mismatched_vocabularies_are_refused(tiny_pair_dir, capsys, tmp_path):
    target, _ = tiny_pair_dir
    _, other_draft = save_pair(tmp_path, vocab_size=64)
    code, _, err = generate(capsys, (target, other_draft), "--prompt", "x")
    assert code == 2
    assert "128" in err and "64" in err and "vocabulary" in err


def test_default_draft_missing_fails_fast_and_writes_nothing(tmp_path, monkeypatch, capsys):
    models = tmp_path / "models"
    models.mkdir()
    monkeypatch.setenv("SPECKV_MODELS_DIR", str(models))
    monkeypatch.chdir(tmp_path)
    code, out, err = generate(capsys, ("default", "default"), "--prompt", "hi")
    assert code == 2 and out == ""
    assert "speckv models distill" in err and "dvc repro distill" in err
    # the draft is checked before the target would be fetched: nothing downloaded, nothing trained
    assert list(tmp_path.rglob("*")) == [models]
