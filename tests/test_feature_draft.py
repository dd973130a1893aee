"""The feature-conditioned (EAGLE-style) draft: lossless in the one decode loop at every compression, its
cache rolled back to the committed prefix, its batched dense traces equal to incremental drafting, saved and
loaded like any draft."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from speckv.profiling.controllers import parse_controller
from speckv.profiling.decode import DecodeConfig, speculative_generate
from speckv.profiling.errors import SpeckvError
from speckv.profiling.feature_draft import is_feature_draft, load_feature_draft
from speckv.profiling.feature_traces import feature_draft_path, target_features
from speckv.profiling.models import load_pair
from speckv.profiling.trace_reference import dense_trace, feature_draft_path_incremental
from speckv.profiling.traces import batched_traces, target_continuations
from tiny import (
    PROMPTS,
    assert_greedy_lossless,
    assert_two_token_law,
    char_tokenizer,
    mostly_bigram_target,
    tiny_target,
    trained_feature_draft,
)


@pytest.fixture(scope="module")
def feature_pair_dir(tmp_path_factory):
    """(target_dir, feature_draft_dir) saved like real checkpoints."""
    root = tmp_path_factory.mktemp("feature_pair")
    target = mostly_bigram_target()  # a random target's continuations have no pattern a draft could learn
    draft = trained_feature_draft(target)
    target.save_pretrained(root / "target")
    char_tokenizer().save_pretrained(root / "target")
    draft.save(root / "draft")
    return root / "target", root / "draft"


@pytest.mark.slow  # ~2 min: every controller on three compressions (bitsandbytes on CPU is slow)
@pytest.mark.parametrize("compression", ["fp32", "int8", "nf4"])
def test_greedy_is_lossless_for_every_controller(feature_pair_dir, compression):
    target_dir, draft_dir = feature_pair_dir
    pair = load_pair(str(target_dir), str(draft_dir), compression, "cpu")
    assert is_feature_draft(pair.draft)
    assert_greedy_lossless(pair, compression)


def test_a_trained_head_drafts_better_than_chance(feature_pair_dir):
    target_dir, draft_dir = feature_pair_dir
    pair = load_pair(str(target_dir), str(draft_dir), "fp32", "cpu")
    ids = char_tokenizer()("The quick brown fox")["input_ids"]
    result = speculative_generate(
        pair.target, pair.draft, ids, parse_controller("fixed:1", 8), DecodeConfig(max_new_tokens=40)
    )
    assert result.acceptance_rate > 0.3  # chance over a 128-token vocabulary is < 0.01


@pytest.mark.parametrize("gamma_max", [1, 4])
def test_batched_feature_traces_equal_incremental_drafting(feature_pair_dir, gamma_max):
    target_dir, draft_dir = feature_pair_dir
    pair = load_pair(str(target_dir), str(draft_dir), "fp32", "cpu")
    for prompt in PROMPTS:
        ids = char_tokenizer()(prompt)["input_ids"]
        continuation = target_continuations(pair.target, [ids], 30, (2,))[0].tokens
        features = target_features(pair.target, ids, continuation)
        fast = feature_draft_path(pair.draft, features, ids, continuation, gamma_max)
        slow = feature_draft_path_incremental(pair.draft, features, ids, continuation, gamma_max)
        assert fast.draft_tokens == slow.draft_tokens
        assert fast.match_len == slow.match_len
        np.testing.assert_allclose(np.array(fast.signals), np.array(slow.signals), atol=1e-4)
        assert sum(fast.match_len) > 0


def test_decode_loop_drafts_what_the_trace_says(feature_pair_dir):
    """Every step's drafted tokens, after any number of rejections, equal the trace's drafts at that position:
    the draft's cache holds exactly the committed prefix (target features), never stale drafted entries."""
    from speckv.profiling.recorder import TableRecorder

    target_dir, draft_dir = feature_pair_dir
    pair = load_pair(str(target_dir), str(draft_dir), "fp32", "cpu")
    ids = char_tokenizer()("x = [i * i for i in range(10)]")["input_ids"]
    run = {"prompt_id": "p", "task": "code", "split": "test", "compression": "fp32"}
    (trace,) = batched_traces(pair.target, pair.draft, [ids], 4, 40, (2,), [run])
    trace = trace.to_pandas()
    recorder = TableRecorder({**run, "controller": "fixed:4", "mode": "greedy"}, prompt_len=len(ids))
    result = speculative_generate(
        pair.target,
        pair.draft,
        ids,
        parse_controller("fixed:4", 4),
        DecodeConfig(max_new_tokens=40),
        recorder=recorder,
    )
    assert result.drafted > result.accepted > 0
    tokens = recorder.token_table().to_pandas()
    by_position = trace.set_index("position")
    for _, row in tokens.iterrows():
        step_start = row["position"] - row["draft_index"]
        expected = by_position.loc[step_start, "draft_prob"][row["draft_index"]]
        assert row["draft_prob"] == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("compression", ["fp32", "int8", "nf4"])
def test_traced_features_are_the_ones_the_decode_loop_reads(feature_pair_dir, monkeypatch, compression):
    """The features a batched trace drafts from (kept by the target's continuation) equal, position by
    position, those the decode loop's target forwards hand the draft (fixed:3: verify chunks of up to 4
    tokens, rejections, re-fed corrections). A teacher-forced pass over the whole sequence need not: int8's
    outlier decomposition makes a row depend on the other rows of its forward."""
    import speckv.profiling.decode as decode_mod

    target_dir, draft_dir = feature_pair_dir
    pair = load_pair(str(target_dir), str(draft_dir), compression, "cpu")
    ids = char_tokenizer()("x = [i * i for i in range(10)]")["input_ids"]
    fed: list[tuple[int, list[int], torch.Tensor]] = []
    real = decode_mod.forward_with_features

    def recording(model, tokens, cache, device, all_logits):
        start = cache.get_seq_length()
        logits, hidden = real(model, tokens, cache, device, all_logits)
        fed.append((start, list(tokens), hidden.float()))
        return logits, hidden

    monkeypatch.setattr(decode_mod, "forward_with_features", recording)
    config = DecodeConfig(max_new_tokens=40, eos_token_ids=(2,))
    result = speculative_generate(pair.target, pair.draft, ids, parse_controller("fixed:3", 8), config)
    assert result.drafted > result.accepted > 0
    seq = ids + result.token_ids
    live: dict[int, torch.Tensor] = {}
    for start, tokens, hidden in fed:
        for j, token in enumerate(tokens):
            if start + j >= len(seq) - 1 or seq[start + j] != token:
                break  # a rejected draft: the rows after it had a wrong token in their context
            live.setdefault(start + j, hidden[j])
    assert sorted(live) == list(range(len(seq) - 1))
    (continuation,) = target_continuations(pair.target, [ids], 40, (2,), features=True)
    assert continuation.tokens == result.token_ids
    torch.testing.assert_close(
        continuation.features, torch.stack([live[p] for p in sorted(live)]), atol=1e-4, rtol=0
    )


@pytest.mark.parametrize("spec", ["threshold:0.6", "entropy:1.5", "entropy:2.5"])
def test_signal_reading_controllers_decide_live_as_in_replay(feature_pair_dir, spec):
    """The signals the loop hands a controller are the trace's: the same stops step by step, live and in
    replay. (The restricted head's -inf logits once gave the loop's fused pass a nan entropy, so every
    entropy-reading controller stopped after one token live while replay, on the traces, did not.)"""
    from speckv.profiling.replay import replay, traces_from_frame

    target_dir, draft_dir = feature_pair_dir
    pair = load_pair(str(target_dir), str(draft_dir), "fp32", "cpu")
    ids = char_tokenizer()("def add(a, b):")["input_ids"]
    run = {"prompt_id": "p", "task": "code", "split": "test", "compression": "fp32"}
    (table,) = batched_traces(pair.target, pair.draft, [ids], 6, 40, (2,), [run])
    (trace,) = traces_from_frame(table.to_pandas())
    live = speculative_generate(
        pair.target, pair.draft, ids, parse_controller(spec, 6), DecodeConfig(max_new_tokens=40, gamma_max=6)
    )
    replayed = replay(parse_controller(spec, 6), trace, [10.0 + k for k in range(7)])
    assert live.gammas == replayed.gammas and live.accepts == replayed.accepts
    assert max(live.gammas) > 1  # the controllers go on past a first token somewhere


def test_incremental_reference_trace_matches(feature_pair_dir):
    target_dir, draft_dir = feature_pair_dir
    pair = load_pair(str(target_dir), str(draft_dir), "fp32", "cpu")
    ids = char_tokenizer()("def add(a, b):")["input_ids"]
    run = {"prompt_id": "p", "task": "code", "split": "test", "compression": "fp32"}
    (fast,) = batched_traces(pair.target, pair.draft, [ids], 4, 30, (2,), [run])
    slow = dense_trace(pair.target, pair.draft, ids, 4, 30, (2,), run)
    assert fast.column("draft_tokens").to_pylist() == slow.column("draft_tokens").to_pylist()
    assert fast.column("match_len").to_pylist() == slow.column("match_len").to_pylist()


@pytest.mark.slow  # ~1 min: 1,500 sampled generations for the chi-square test
def test_sampled_sequences_follow_the_target():
    """The law of the first two generated tokens equals the target's, with a restricted-head feature draft."""
    vocab = 32
    target = mostly_bigram_target(vocab_size=vocab)
    draft = trained_feature_draft(target, steps=60, head_size=24)
    assert_two_token_law(target, draft, vocab)


def test_feature_draft_refuses_another_target(feature_pair_dir, tmp_path):
    from tiny import tiny_config
    from transformers import LlamaForCausalLM

    _, draft_dir = feature_pair_dir
    config = tiny_config(hidden=128)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "wide")
    char_tokenizer().save_pretrained(tmp_path / "wide")
    with pytest.raises(SpeckvError, match="hidden size 64"):
        load_pair(str(tmp_path / "wide"), str(draft_dir), "fp32", "cpu")
    target_dir, _ = feature_pair_dir
    with pytest.raises(SpeckvError, match="own dtype"):
        load_pair(str(target_dir), str(draft_dir), "fp32", "cpu", draft_compression="int8")


def test_save_and_load_round_trip(feature_pair_dir):
    _, draft_dir = feature_pair_dir
    draft = load_feature_draft(draft_dir, torch.device("cpu"))
    again = load_feature_draft(draft_dir, torch.device("cpu"))
    for (name, a), (_, b) in zip(draft.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    broken = draft_dir.parent / "broken"
    broken.mkdir()
    (broken / "feature_draft.json").write_text("{}")
    with pytest.raises(SpeckvError, match="cannot load the feature draft"):
        load_feature_draft(broken, torch.device("cpu"))
    # a config that does not match the weights (another head size) is one clear error too
    mismatched = draft_dir.parent / "mismatched"
    shutil.copytree(draft_dir, mismatched)
    config = json.loads((mismatched / "feature_draft.json").read_text())
    (mismatched / "feature_draft.json").write_text(
        json.dumps({**config, "head_size": config["head_size"] + 1})
    )
    with pytest.raises(SpeckvError, match="cannot load the feature draft"):
        load_feature_draft(mismatched, torch.device("cpu"))


def test_transformers_generate_with_a_feature_draft(feature_pair_dir):
    """`target.generate(custom_generate=speckv.assisted(feature_draft, spec))` is the target's own greedy output."""
    from speckv.hf import GenerateError, assisted

    target_dir, draft_dir = feature_pair_dir
    pair = load_pair(str(target_dir), str(draft_dir), "fp32", "cpu")
    inputs = char_tokenizer()("The quick brown fox", return_tensors="pt")
    expected = pair.target.generate(**inputs, do_sample=False, max_new_tokens=24, pad_token_id=0)
    for spec in ["fixed:4", "threshold:0.4+trim"]:
        method = assisted(pair.draft, spec)
        out = pair.target.generate(**inputs, max_new_tokens=24, pad_token_id=0, custom_generate=method)
        assert torch.equal(out, expected), spec
        assert method.last_result.accepted > 0
    wide = tiny_target()
    wide.config.hidden_size = 128  # what check_target reads; the forward never runs
    with pytest.raises(GenerateError, match="hidden size"):
        wide.generate(
            **inputs, max_new_tokens=4, pad_token_id=0, custom_generate=assisted(pair.draft, "fixed:2")
        )
