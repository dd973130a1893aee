"""Teacher-forced, batched dense traces equal the incremental reference on the tiny pair."""

import math

import pytest
import torch
from speckv.profiling.models import load_pair
from speckv.profiling.trace_reference import draft_path_incremental
from speckv.profiling.traces import (
    continuation_incremental,
    draft_path,
    target_continuations,
    target_features,
)
from tiny import EOS_ID

PROMPTS = [[1, 5, 9, 40, 41, 12], [1, 7], [1, 30, 31, 32, 33, 34, 35, 36, 37, 38, 70], [1, 22, 23, 24], [9]]


@pytest.mark.parametrize("compression", ["fp32", "int8", "nf4"])
def test_batched_continuations_equal_the_decode_loop(tiny_pair_dir, compression):
    target, draft = tiny_pair_dir
    pair = load_pair(str(target), str(draft), compression, "cpu")
    batched = target_continuations(pair.target, PROMPTS, 20, (EOS_ID,), batch_size=3)
    for ids, got in zip(PROMPTS, batched, strict=True):
        want = continuation_incremental(pair.target, ids, 20, (EOS_ID,))
        assert got.tokens == want.tokens
        assert len(got.target_top1) == len(got.tokens) == len(got.target_entropy)
        assert got.target_top1 == pytest.approx(want.target_top1, abs=1e-4, nan_ok=True)
        assert got.target_entropy == pytest.approx(want.target_entropy, abs=1e-3, nan_ok=True)


@pytest.mark.parametrize("compression", ["fp32", "int8", "nf4"])
def test_continuations_keep_the_features_a_teacher_forced_pass_gives(tiny_pair_dir, compression):
    """With `features=True` the batched decoding keeps the target's final hidden states of positions
    0 .. L-2 (what a feature draft reads): equal to the incremental reference (prefill, then one token per
    forward), and the continuations themselves unchanged."""
    target, draft = tiny_pair_dir
    pair = load_pair(str(target), str(draft), compression, "cpu")
    plain = target_continuations(pair.target, PROMPTS, 20, (EOS_ID,), batch_size=3)
    kept = target_continuations(pair.target, PROMPTS, 20, (EOS_ID,), batch_size=3, features=True)
    assert [c.tokens for c in kept] == [c.tokens for c in plain]
    # the group holding the one-token prompt [9] is decoded one prompt at a time, without features
    assert [c.features is None for c in kept] == [False, False, False, True, True]
    for ids, c in zip(PROMPTS[:3], kept[:3], strict=True):
        want = target_features(pair.target, ids, c.tokens)
        assert c.features.shape == want.shape
        torch.testing.assert_close(c.features, want, atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("gamma_max", [1, 4, 8])
def test_teacher_forced_draft_path_equals_incremental_drafting(tiny_pair_dir, gamma_max):
    target, draft = tiny_pair_dir
    pair = load_pair(str(target), str(draft), "fp32", "cpu")
    for ids in PROMPTS:
        cont = continuation_incremental(pair.target, ids, 24, (EOS_ID,)).tokens
        fast = draft_path(pair.draft, ids, cont, gamma_max)
        slow = draft_path_incremental(pair.draft, ids, cont, gamma_max)
        assert fast.draft_tokens == slow.draft_tokens
        assert fast.match_len == slow.match_len
        assert any(0 < m < gamma_max for m in slow.match_len) or gamma_max == 1
        for row_fast, row_slow in zip(fast.signals, slow.signals, strict=True):
            for a, b in zip(row_fast, row_slow, strict=True):
                assert a == pytest.approx(b, abs=1e-4)


def test_confidence_is_of_the_token_before_the_step(tiny_pair_dir):
    target, draft = tiny_pair_dir
    pair = load_pair(str(target), str(draft), "fp32", "cpu")
    ids = PROMPTS[0]
    cont = continuation_incremental(pair.target, ids, 6, (EOS_ID,))
    with torch.inference_mode():
        logits = pair.target(input_ids=torch.tensor([ids + cont.tokens])).logits[0]
    probs = torch.softmax(logits, dim=-1)
    # step i starts after token len(ids) - 1 + i, chosen from the distribution at the position before it
    for i, top1 in enumerate(cont.target_top1):
        assert top1 == pytest.approx(float(probs[len(ids) - 2 + i].max()), abs=1e-4)
    assert not any(math.isnan(v) for v in cont.target_entropy)
