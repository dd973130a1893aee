"""Teacher data for distillation: the target's responses with its hidden states, shared prefills that decode
as alone, the row plan, and the per-row cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import speckv.data.teacher as teacher_mod
import torch
from speckv.data.distill import DistillConfig
from tiny import save_word_level_target
from transformers import AutoModelForCausalLM


def test_teacher_hidden_states_line_up_with_tokens(tmp_path: Path) -> None:
    """The recorded hidden state at position i must be the target's own state predicting token i + 1."""
    target = AutoModelForCausalLM.from_pretrained(save_word_level_target(tmp_path / "target")).eval()
    rows = [{"input_ids": [1, 5, 6, 7]}, {"input_ids": [1, 9]}]
    for row, seq in zip(rows, teacher_mod.generate_batch(target, rows, 4, 2, 2), strict=True):
        tokens = seq["tokens"].long()
        assert seq["hidden"].shape[0] == len(tokens) - 1 and seq["n_prompt"] == len(row["input_ids"])
        with torch.no_grad():
            ref = target.model(input_ids=tokens[None, :-1]).last_hidden_state[0]
        assert torch.allclose(seq["hidden"].float(), ref, atol=1e-2)
        greedy = (ref @ target.model.embed_tokens.weight.T).argmax(-1)
        assert torch.equal(greedy[seq["n_prompt"] - 1 :], tokens[seq["n_prompt"] :])


def test_shared_prompt_rows_are_prefilled_once_and_decode_as_alone(tmp_path: Path) -> None:
    """Rows with one prompt (greedy and sampled) share one prefill; each row decodes as it would alone:
    greedy rows give `generate()`'s tokens, a sampled row the draws its own generator gives alone."""
    target = AutoModelForCausalLM.from_pretrained(save_word_level_target(tmp_path / "target")).eval()
    a, b = [1, 5, 6, 7], [1, 9]
    rows = [{"input_ids": a}, {"input_ids": b}, {"input_ids": a}, {"input_ids": a}]
    temps = [0.0, 0.0, 1.5, 0.0]
    prefills: list[tuple[int, ...]] = []
    hook = target.model.register_forward_hook(
        lambda _m, args, kwargs, _out: (
            prefills.append(tuple(kwargs["input_ids"].shape)) if kwargs["input_ids"].shape[1] > 1 else None
        ),
        with_kwargs=True,
    )
    try:
        batch = teacher_mod.generate_batch(target, rows, 6, 2, 2, temps, torch.Generator().manual_seed(3))
    finally:
        hook.remove()
    assert prefills == [(2, 4)]  # two distinct prompts, one prefill each, in one forward
    assert torch.equal(batch[0]["tokens"], batch[3]["tokens"])
    for row, seq in zip(rows, batch, strict=True):
        assert seq["n_prompt"] == len(row["input_ids"])
        assert seq["hidden"].shape == (len(seq["tokens"]) - 1, target.config.hidden_size)
    for i in (0, 1):
        ids = torch.tensor([rows[i]["input_ids"]])
        ref = target.generate(
            input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=2, eos_token_id=2
        )
        assert torch.equal(batch[i]["tokens"].long(), ref[0])
        alone = teacher_mod.generate_batch(target, [rows[i]], 6, 2, 2)[0]
        assert torch.allclose(batch[i]["hidden"].float(), alone["hidden"].float(), atol=1e-2)
    alone = teacher_mod.generate_batch(target, [rows[2]], 6, 2, 2, 1.5, torch.Generator().manual_seed(3))[0]
    assert torch.equal(batch[2]["tokens"], alone["tokens"])
    assert len(batch[2]["tokens"]) > len(a) and not torch.equal(batch[2]["tokens"], batch[0]["tokens"])


def test_prompt_batches_keep_a_prompts_rows_together_in_order_of_length() -> None:
    rows = [{"input_ids": [1] * n} for n in (5, 2, 5, 3, 2, 5)]
    assert teacher_mod._prompt_batches(rows, 3) == [[1, 4, 3], [0, 2, 5]]
    assert teacher_mod._prompt_batches(rows, 2) == [[1, 4], [3], [0, 2], [5]]


def record_generation(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Patch teacher generation to log the key of every row it generates; returns that (live) log."""
    generated: list[str] = []
    real = teacher_mod.generate_teacher_data

    def counting(target: object, rows: list[dict], *args: object) -> list[dict]:
        generated.extend(teacher_mod.row_key(r) for r in rows)
        return real(target, rows, *args)

    monkeypatch.setattr(teacher_mod, "generate_teacher_data", counting)
    return generated


def test_teacher_cache_generates_only_new_prompts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = AutoModelForCausalLM.from_pretrained(save_word_level_target(tmp_path / "target")).eval()
    rows = [{"prompt_id": f"math/{i}", "task": "math", "input_ids": [1, 4 + i, 9]} for i in range(3)]
    config = DistillConfig(max_new_tokens=3, gen_batch_size=2)
    generated = record_generation(monkeypatch)
    path = tmp_path / "teacher.pt"
    first = teacher_mod.load_or_generate_teacher(path, target, rows[:2], config, 2, 2)
    both = teacher_mod.load_or_generate_teacher(path, target, rows, config, 2, 2)
    assert generated == ["math/0", "math/1", "math/2"]
    assert torch.equal(first[0]["tokens"], both[0]["tokens"]) and len(both) == 3
    changed = [{**rows[0], "input_ids": [1, 7, 7]}]
    teacher_mod.load_or_generate_teacher(path, target, changed, config, 2, 2)
    assert generated[-1] == "math/0"


def test_plan_teacher_rows_fills_small_tasks_with_sampled_repeats() -> None:
    rows = [{"prompt_id": f"chat/{i}", "task": "chat", "input_ids": [1]} for i in range(2)]
    rows += [{"prompt_id": f"math/{i}", "task": "math", "input_ids": [1]} for i in range(5)]
    plan = teacher_mod.plan_teacher_rows(rows, 3)
    assert [(r["key"], r["sample"]) for r in plan] == [
        ("chat/0", 0),
        ("chat/1", 0),
        ("chat/0#s1", 1),
        ("math/0", 0),
        ("math/1", 0),
        ("math/2", 0),
    ]


@pytest.mark.slow  # ~10 s of teacher generation
def test_sampled_teacher_data_is_seeded_and_cached_apart_from_greedy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = AutoModelForCausalLM.from_pretrained(save_word_level_target(tmp_path / "target")).eval()
    rows = [{"prompt_id": f"math/{i}", "task": "math", "input_ids": [1, 4 + i, 9]} for i in range(2)]
    config = DistillConfig(max_new_tokens=6, gen_batch_size=4, sequences_per_task=4, sample_temperature=1.5)
    plan = teacher_mod.plan_teacher_rows(rows, config.sequences_per_task)
    first = teacher_mod.load_or_generate_teacher(tmp_path / "a.pt", target, plan, config, 2, 2)
    second = teacher_mod.load_or_generate_teacher(tmp_path / "b.pt", target, plan, config, 2, 2)
    assert [s["sample"] for s in first] == [0, 0, 1, 1]
    assert [s["temperature"] for s in first] == [0.0, 0.0, 1.5, 1.5]
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a["tokens"], b["tokens"])  # seeded: two from-scratch runs agree
    # A new temperature regenerates the sampled repeats only; a new target dtype regenerates everything.
    generated = record_generation(monkeypatch)
    hotter = DistillConfig(max_new_tokens=6, gen_batch_size=4, sequences_per_task=4, sample_temperature=2.0)
    teacher_mod.load_or_generate_teacher(tmp_path / "a.pt", target, plan, hotter, 2, 2)
    assert sorted(generated) == ["math/0#s1", "math/1#s1"]
    generated.clear()
    teacher_mod.load_or_generate_teacher(tmp_path / "a.pt", target.to(torch.bfloat16), plan, hotter, 2, 2)
    assert len(generated) == 4


def test_dev_and_test_teachers_are_generated_together_and_cached_apart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One generation run fills both files; each file then serves its own rows without generating."""
    target = AutoModelForCausalLM.from_pretrained(save_word_level_target(tmp_path / "target")).eval()
    dev = [{"prompt_id": f"math/d{i}", "task": "math", "input_ids": [1, 4 + i, 9]} for i in range(2)]
    test = [{"prompt_id": f"math/t{i}", "task": "math", "input_ids": [1, 6 + i]} for i in range(3)]
    config = DistillConfig(max_new_tokens=3, gen_batch_size=8)
    batches: list[int] = []
    real = teacher_mod.generate_batch

    def counting(target: object, rows: list[dict], *args: object) -> list[dict]:
        batches.append(len(rows))
        return real(target, rows, *args)

    monkeypatch.setattr(teacher_mod, "generate_batch", counting)
    jobs = [(tmp_path / "dev.pt", dev), (tmp_path / "test.pt", test)]
    got_dev, got_test = teacher_mod.load_or_generate_teachers(jobs, target, config, 2, 2)
    assert batches == [5]  # one shared batch
    assert [s["tokens"][:3].tolist() for s in got_dev] == [[1, 4, 9], [1, 5, 9]]
    assert [s["tokens"][:2].tolist() for s in got_test] == [[1, 6], [1, 7], [1, 8]]
    alone = teacher_mod.load_or_generate_teacher(tmp_path / "test.pt", target, test, config, 2, 2)
    assert batches == [5]
    assert all(torch.equal(a["tokens"], b["tokens"]) for a, b in zip(alone, got_test, strict=True))
    assert set(torch.load(tmp_path / "dev.pt", weights_only=True)["seqs"]) == {"math/d0", "math/d1"}


def test_prefill_in_length_groups_gives_the_single_forwards_sequences(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Prompts of mixed lengths prefilled in several similar-length forwards (zeros where padded) decode to
    the same tokens and hidden states as one left-padded forward over all of them."""
    target = AutoModelForCausalLM.from_pretrained(save_word_level_target(tmp_path / "target")).eval()
    rows = [
        {"prompt_id": f"p{i}", "task": "math", "input_ids": [1] + [4 + (i * 7 + j) % 50 for j in range(n)]}
        for i, n in enumerate([2, 9, 3, 17, 5, 9])
    ]
    rows.append({**rows[1], "prompt_id": "p1#s1"})  # a repeat shares its prompt's prefill
    runs = []
    for budget in (10**6, 20):
        monkeypatch.setattr(teacher_mod, "PREFILL_TOKENS", budget)
        runs.append(teacher_mod.generate_batch(target, rows, 6, 0, 2))
    for one, grouped in zip(*runs, strict=True):
        assert torch.equal(one["tokens"], grouped["tokens"])
        torch.testing.assert_close(one["hidden"].float(), grouped["hidden"].float(), atol=2e-3, rtol=0)
