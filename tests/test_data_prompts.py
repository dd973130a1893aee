"""Prompt suites: the split by prompt, prompt-file round trip and truncation, on a tiny word tokenizer."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from speckv.data.prompts import (
    SUMMARY_INSTRUCTION,
    assign_split,
    build_prompt_file,
    check_splits,
    load_prompt_file,
    load_prompts,
    make_splits,
    write_splits,
)
from speckv.profiling.errors import SpeckvError
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

WORDS = [f"w{i}" for i in range(40)]
CHAT_TEMPLATE = (
    "{% for m in messages %}<s> {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}go{% endif %}"
)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    specials = ["<unk>", "<s>", "</s>", "go"]
    instruction = SUMMARY_INSTRUCTION.split()
    vocab = {w: i for i, w in enumerate(dict.fromkeys(specials + instruction + WORDS))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", eos_token="</s>", pad_token="</s>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def words(n: int, offset: int = 0) -> str:
    return " ".join(WORDS[(offset + i) % len(WORDS)] for i in range(n))


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def suites(tmp_path: Path) -> Path:
    d = tmp_path / "suites"
    d.mkdir()
    write_jsonl(
        d / "humaneval.jsonl", [{"task_id": f"HumanEval/{i}", "prompt": words(5, i)} for i in range(6)]
    )
    write_jsonl(d / "gsm8k_test.jsonl", [{"question": words(4, i), "answer": "x"} for i in range(8)])
    write_jsonl(
        d / "mt_bench.jsonl", [{"question_id": 81 + i, "turns": [words(3, i), "second"]} for i in range(5)]
    )
    write_jsonl(
        d / "summarization.jsonl", [{"id": f"cnn-test-{i}", "article": words(60, i)} for i in range(4)]
    )
    return d


def test_split_is_deterministic_by_prompt_and_covers_each_prompt_once(suites: Path) -> None:
    prompts = load_prompts(suites)
    first, second = make_splits(prompts), make_splits(list(reversed(prompts)))
    assert first == second
    assert set(first["splits"]) == {p.prompt_id for p in prompts}
    assert set(first["splits"].values()) <= {"distill", "train", "dev", "test"}
    assert first["splits"]["code/HumanEval-0"] == assign_split("code/HumanEval-0")


def test_split_proportions_on_the_real_suites_and_committed_file_is_current() -> None:
    splits = check_splits()
    share = Counter(splits.values())
    assert len(splits) == 164 + 1319 + 80 + 200
    assert abs(share["distill"] / len(splits) - 0.50) < 0.04
    assert abs(share["train"] / len(splits) - 0.10) < 0.03
    assert abs(share["test"] / len(splits) - 0.25) < 0.04


def test_check_splits_rejects_a_stale_file(suites: Path, tmp_path: Path) -> None:
    prompts = load_prompts(suites)
    path = tmp_path / "splits.json"
    write_splits(path, prompts)
    data = json.loads(path.read_text())
    pid = "math/gsm8k-0"
    data["splits"][pid] = "train" if data["splits"][pid] != "train" else "test"
    path.write_text(json.dumps(data))
    with pytest.raises(SpeckvError, match="disagrees"):
        check_splits(path, prompts)


def test_prompt_ids_follow_the_suites(suites: Path) -> None:
    ids = [p.prompt_id for p in load_prompts(suites)]
    assert ids[0] == "code/HumanEval-0"
    assert "math/gsm8k-7" in ids and "chat/mtbench-85" in ids and "summarization/cnn-cnn-test-3" in ids


@pytest.mark.parametrize("chat", [True, False])
def test_prompt_file_round_trip_and_truncation(suites: Path, tmp_path: Path, chat: bool) -> None:
    tokenizer = tiny_tokenizer()
    splits_path = tmp_path / "splits.json"
    write_splits(splits_path, load_prompts(suites))
    out = tmp_path / "prompts.jsonl"
    rows = build_prompt_file(tokenizer, out, chat, 30, suites_dir=suites, splits_path=splits_path)
    by_id = {r["prompt_id"]: r for r in rows}
    loaded = load_prompt_file(out)
    assert len(loaded) == len(rows) == 23 and all(r == by_id[r["prompt_id"]] for r in loaded)
    for row in rows:
        assert row["n_tokens"] == len(row["input_ids"]) <= 30
        assert row["input_ids"] == tokenizer(row["text"], add_special_tokens=False)["input_ids"]
    summaries = [r for r in rows if r["task"] == "summarization"]
    assert summaries and all(r["truncated"] and r["orig_tokens"] > 60 for r in summaries)
    assert all(SUMMARY_INSTRUCTION in r["text"] for r in summaries)
    assert all(not r["truncated"] for r in rows if r["task"] != "summarization")
    if chat:
        assert all(r["text"].startswith("<s>") and r["text"].endswith("go") for r in rows)


def test_a_tokenizer_without_chat_template_takes_plain_text_only(suites: Path, tmp_path: Path) -> None:
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = None  # a base model's
    splits_path = tmp_path / "splits.json"
    write_splits(splits_path, load_prompts(suites))
    out = tmp_path / "prompts.jsonl"
    with pytest.raises(SpeckvError, match="prompts.chat: false"):
        build_prompt_file(tokenizer, out, True, 30, suites_dir=suites, splits_path=splits_path)
    assert not out.exists()
    rows = build_prompt_file(tokenizer, out, False, 30, suites_dir=suites, splits_path=splits_path)
    assert rows and all(not r["text"].startswith("<s>") for r in rows)


def test_load_prompt_file_selects_first_n_per_task_stably(suites: Path, tmp_path: Path) -> None:
    splits_path = tmp_path / "splits.json"
    write_splits(splits_path, load_prompts(suites))
    out = tmp_path / "prompts.jsonl"
    build_prompt_file(tiny_tokenizer(), out, True, 64, suites_dir=suites, splits_path=splits_path)
    picked = load_prompt_file(out, tasks=["math", "code"], per_task=2)
    assert Counter(r["task"] for r in picked) == {"math": 2, "code": 2}
    assert picked == load_prompt_file(out, tasks=["code", "math"], per_task=2)
    train = load_prompt_file(out, splits=["train"])
    assert train and all(r["split"] == "train" for r in train)


def test_load_prompt_file_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(SpeckvError, match="not found"):
        load_prompt_file(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt_id": "a"}\nnot json\n')
    with pytest.raises(SpeckvError, match="bad.jsonl:1"):
        load_prompt_file(bad)


def test_build_prompt_file_keeps_the_old_file_when_it_fails(suites: Path, tmp_path: Path) -> None:
    out = tmp_path / "prompts.jsonl"
    out.write_text("old\n")
    with pytest.raises(SpeckvError, match="split"):
        build_prompt_file(
            tiny_tokenizer(), out, True, 64, suites_dir=suites, splits_path=tmp_path / "none.json"
        )
    assert out.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts.jsonl", "suites"]
