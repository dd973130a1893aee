"""The decode loop is lossless: greedy output equals the target's own generate(), sampling keeps its law."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare
from speckv.profiling.controllers import parse_controller
from speckv.profiling.decode import DecodeConfig, speculative_generate, verify_sampling
from speckv.profiling.kv_cache import truncate
from speckv.profiling.models import load_pair
from tiny import assert_greedy_lossless, assert_two_token_law, greedy_reference, perturbed_draft, tiny_target


@pytest.mark.slow  # ~2 min: every controller on three compressions (bitsandbytes on CPU is slow)
@pytest.mark.parametrize("compression", ["fp32", "int8", "nf4"])
def test_greedy_is_lossless_for_every_controller(tiny_pair_dir, compression):
    target_dir, draft_dir = tiny_pair_dir
    assert_greedy_lossless(load_pair(str(target_dir), str(draft_dir), compression, "cpu"), compression)


def test_identical_draft_is_always_accepted():
    """If either cache were rolled back wrongly, a draft equal to the target would stop agreeing with it."""
    target = tiny_target()
    ids = list(range(5, 25))
    for spec in ["fixed:3", "fixed:8", "heuristic"]:
        result = speculative_generate(
            target, target, ids, parse_controller(spec, 8), DecodeConfig(max_new_tokens=40)
        )
        assert result.acceptance_rate == 1.0
        assert result.token_ids == greedy_reference(target, ids, 40)


def test_unrelated_draft_is_rejected_yet_lossless():
    target = tiny_target(seed=0)
    stranger = tiny_target(seed=123)
    ids = list(range(5, 25))
    result = speculative_generate(
        target, stranger, ids, parse_controller("fixed:5", 8), DecodeConfig(max_new_tokens=30)
    )
    assert result.acceptance_rate < 0.2
    assert result.token_ids == greedy_reference(target, ids, 30)


@pytest.mark.parametrize("max_new", [1, 2, 7, 9])
def test_max_new_tokens_is_exact(max_new):
    target = tiny_target()
    draft = perturbed_draft(target, 0.04)
    ids = list(range(3, 15))
    for spec in ["none", "fixed:4", "fixed:8"]:
        result = speculative_generate(
            target, draft, ids, parse_controller(spec, 8), DecodeConfig(max_new_tokens=max_new)
        )
        assert result.token_ids == greedy_reference(target, ids, max_new)
        assert result.new_tokens == max_new


def test_eos_stops_exactly():
    target = tiny_target()
    draft = perturbed_draft(target, 0.04)
    ids = list(range(3, 15))
    free = greedy_reference(target, ids, 30)
    eos = free[11]  # a token the target really produces, so the stop lands mid-draft for some controllers
    expected = greedy_reference(target, ids, 30, eos=eos)
    assert expected[-1] == eos and len(expected) <= 12
    for spec in ["none", "fixed:2", "fixed:8", "heuristic"]:
        config = DecodeConfig(max_new_tokens=30, eos_token_ids=(eos,))
        result = speculative_generate(target, draft, ids, parse_controller(spec, 8), config)
        assert result.token_ids == expected
        assert result.stop_reason == "eos"


def test_truncate_drops_only_the_tail():
    from transformers import DynamicCache

    target = tiny_target()
    cache = DynamicCache(config=target.config)
    target(input_ids=torch.arange(3, 13)[None], past_key_values=cache, use_cache=True)
    keys_before = cache.layers[0].keys.clone()
    truncate(cache, 6)
    assert cache.get_seq_length() == 6
    assert torch.equal(cache.layers[0].keys, keys_before[..., :6, :])
    truncate(cache, 8)  # growing is not truncating: nothing happens
    assert cache.get_seq_length() == 6


def test_rejection_sampling_keeps_the_target_distribution():
    """Leviathan et al., Theorem 3.5: the first emitted token is distributed as p, whatever q is."""
    gen = torch.Generator().manual_seed(0)
    vocab = 6
    p = torch.tensor([[0.35, 0.25, 0.2, 0.1, 0.07, 0.03], [0.1, 0.1, 0.2, 0.2, 0.2, 0.2]])
    q = torch.tensor([0.05, 0.05, 0.4, 0.3, 0.1, 0.1])
    n = 20000
    counts = np.zeros(vocab)
    for _ in range(n):
        drafted = [int(torch.multinomial(q, 1, generator=gen))]
        accepted, nxt, _ = verify_sampling(drafted, [q], p, gen)
        counts[drafted[0] if accepted else nxt] += 1
    assert chisquare(counts, p[0].numpy() * n).pvalue > 0.001
    # and a biased rule (always accept) is caught by the same test
    biased = np.bincount(torch.multinomial(q, n, replacement=True, generator=gen).numpy(), minlength=vocab)
    assert chisquare(biased, p[0].numpy() * n).pvalue < 1e-6


@pytest.mark.slow  # ~1 min: 1,500 sampled generations for the chi-square test
def test_sampled_sequences_follow_the_target():
    """End to end on a tiny model: the law of the first two generated tokens equals the target's."""
    vocab = 32
    target = tiny_target(vocab_size=vocab)
    draft = perturbed_draft(target, 0.3)
    assert_two_token_law(target, draft, vocab)


def test_top_k_top_p_restrict_support():
    from speckv.profiling.decode import logits_to_probs

    logits = torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0])
    probs = logits_to_probs(logits, DecodeConfig(temperature=1.0, top_k=2))
    assert (probs[2:] == 0).all() and probs[:2].sum() == pytest.approx(1.0)
    probs = logits_to_probs(logits, DecodeConfig(temperature=1.0, top_p=0.7))
    assert probs[0] > 0 and probs[1] > 0 and (probs[2:] == 0).all()


def test_recorder_matches_the_loop(tiny_pair_dir):
    from speckv.profiling.recorder import TableRecorder

    target = tiny_target()
    draft = perturbed_draft(target, 0.04)
    ids = list(range(3, 20))
    run = {
        "prompt_id": "p0",
        "task": "code",
        "split": "train",
        "compression": "fp32",
        "controller": "fixed:8",
        "mode": "greedy",
    }
    recorder = TableRecorder(run, prompt_len=len(ids))
    result = speculative_generate(
        target, draft, ids, parse_controller("fixed:8", 8), DecodeConfig(max_new_tokens=40), recorder=recorder
    )
    tokens = recorder.token_table().to_pandas()
    steps = recorder.step_table().to_pandas()
    assert steps["gamma"].tolist() == result.gammas
    assert steps["accepted"].tolist() == result.accepts
    assert steps["produced"].sum() == result.new_tokens
    assert len(tokens) == result.drafted
    per_step = tokens.groupby("step")["accepted"].sum().tolist()
    assert per_step == [a for a, g in zip(result.accepts, result.gammas, strict=True) if g]
    labelled = tokens[tokens["labelled"]]
    # every labelled token is accepted except the first rejection of each step
    assert (labelled.groupby("step")["accepted"].apply(lambda s: (~s).sum() <= 1)).all()
    assert (tokens["draft_prob"] == tokens["top1_prob"]).all()  # greedy drafts the argmax
    assert (tokens["draft_prob_min"] <= tokens["draft_prob"] + 1e-7).all()


def test_fused_signals_equal_the_softmax_definitions():
    """greedy_signals (the loop's per-token pass) and target_signals equal the signals computed from the
    softmax, including a tie for the top token, a sharp, almost one-hot row and -inf logits."""
    from speckv.profiling.signals import distribution_signals, greedy_signals, target_signals

    generator = torch.Generator().manual_seed(0)
    rows = [torch.randn(4096, generator=generator) * scale for scale in (0.1, 1.0, 4.0, 30.0)]
    tie = torch.randn(4096, generator=generator)
    tie[[7, 11]] = tie.max() + 1.0
    rows.append(tie)
    masked = torch.randn(4096, generator=generator)
    masked[1000:] = float("-inf")  # a restricted head's full-vocabulary logits (the feature draft's)
    rows.append(masked)
    for logits in rows:
        token, values = greedy_signals(logits.half())
        probs = torch.softmax(logits.half().float(), dim=-1)
        assert token == int(probs.argmax())
        np.testing.assert_allclose(
            values, distribution_signals(probs[None], [token])[0], atol=2e-6, rtol=1e-5
        )
    stacked = torch.stack(rows)
    logp = torch.log_softmax(stacked, dim=-1)
    reference = torch.stack(
        [logp.max(dim=-1).values.exp(), torch.special.entr(logp.exp()).sum(dim=-1)], dim=-1
    )
    np.testing.assert_allclose(target_signals(stacked), reference.numpy(), atol=2e-6, rtol=1e-5)
    assert target_signals(stacked[:0]) == []
