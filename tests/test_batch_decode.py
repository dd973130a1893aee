"""Batched speculative decoding is lossless row by row: each row's greedy output equals the target's own for its
prompt, whatever the batch, the compression or the controller; finished rows leave the batch; sampling is
reproducible; bad input is one clear error."""

from __future__ import annotations

import pytest
import torch
from eval_synthetic import write_mlp_export
from speckv.profiling.batch_decode import speculative_generate_batch
from speckv.profiling.controllers import parse_controller
from speckv.profiling.decode import DecodeConfig, speculative_generate
from speckv.profiling.errors import SpeckvError
from speckv.profiling.models import load_pair
from tiny import CONTROLLERS, PROMPTS, char_tokenizer, greedy_reference, perturbed_draft, tiny_target

N = 24
# different lengths, a one-token prompt among them (nothing to prefill: its row starts with an empty cache)
BATCH_PROMPTS = [*PROMPTS, "a"]


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    return write_mlp_export(
        tmp_path_factory.mktemp("export") / "export", ("fp32", "int8", "nf4"), gamma_max=8
    )


def controllers(spec: str, n: int, compression: str = "fp32"):
    return [parse_controller(spec, 8, compression) for _ in range(n)]


@pytest.mark.parametrize("compression", ["fp32", "int8", "nf4"])
def test_greedy_rows_equal_the_target_alone(tiny_pair_dir, export_dir, compression):
    """Every controller, the learned `mlp:` rule included, at batch 2 and 4: each row is the target's own
    greedy continuation, and rows really advanced by different lengths in one step (or the per-row caches
    were never tested)."""
    pair = load_pair(*map(str, tiny_pair_dir), compression, "cpu")
    tokenizer = char_tokenizer()
    prompts = [tokenizer(p)["input_ids"] for p in BATCH_PROMPTS]
    assert len({len(p) for p in prompts}) == len(prompts)
    expected = [greedy_reference(pair.target, ids, N) for ids in prompts]
    accepted = rejected = uneven = 0
    for spec in [*CONTROLLERS, f"mlp:{export_dir}"]:
        for batch in (2, 4):
            out = speculative_generate_batch(
                pair.target,
                pair.draft,
                prompts[:batch],
                controllers(spec, batch, compression),
                DecodeConfig(max_new_tokens=N),
                compression,
            )
            for row, want, ids in zip(out.rows, expected, prompts, strict=False):
                assert row.token_ids == want, f"{compression} {spec} batch {batch} prompt {ids}"
                accepted += row.accepted
                rejected += row.drafted - row.accepted
            assert out.batch_sizes[0] == batch
            steps = min(row.steps for row in out.rows)
            uneven += sum(len({row.produced[s] for row in out.rows}) > 1 for s in range(steps))
    assert accepted > 40 and rejected > 40 and uneven > 10


def test_identical_draft_is_always_accepted():
    """A draft equal to the target agrees with it at every position only if both caches hold each row's
    own sequence at its own positions after every rollback."""
    target = tiny_target()
    prompts = [list(range(5, 25)), list(range(40, 47)), list(range(60, 89))]
    expected = [greedy_reference(target, ids, 40) for ids in prompts]
    for spec in ["fixed:3", "fixed:8", "heuristic"]:
        out = speculative_generate_batch(
            target, target, prompts, controllers(spec, 3), DecodeConfig(max_new_tokens=40)
        )
        assert out.acceptance_rate == 1.0
        assert [row.token_ids for row in out.rows] == expected


def test_finished_rows_leave_the_batch():
    """A row that meets EOS early retires (the batch shrinks) and the others go on to max_new_tokens."""
    target = tiny_target()
    draft = perturbed_draft(target, 0.04)
    prompts = [list(range(3, 15)), list(range(30, 38)), list(range(50, 70))]
    free = [greedy_reference(target, ids, 30) for ids in prompts]
    # a token the first prompt's continuation meets early and the others never produce
    eos = next(t for t in free[0][2:] if t not in free[1] and t not in free[2])
    expected = [greedy_reference(target, ids, 30, eos=eos) for ids in prompts]
    assert expected[0][-1] == eos and len(expected[0]) < 30
    for spec in ["none", "fixed:4", "heuristic", "threshold:0.4+trim"]:
        config = DecodeConfig(max_new_tokens=30, eos_token_ids=(eos,))
        out = speculative_generate_batch(target, draft, prompts, controllers(spec, 3), config)
        assert [row.token_ids for row in out.rows] == expected, spec
        assert [row.stop_reason for row in out.rows] == ["eos", "length", "length"]
        retired = out.rows[0].steps  # the first step without the finished row
        assert out.batch_sizes[:retired] == [3] * retired and out.batch_sizes[retired] == 2
        assert out.batch_sizes == sorted(out.batch_sizes, reverse=True)
        assert out.steps == max(row.steps for row in out.rows) > retired


def test_statistics_come_with_the_tokens():
    target = tiny_target()
    draft = perturbed_draft(target, 0.04)
    prompts = [list(range(3, 15)), list(range(30, 38))]
    out = speculative_generate_batch(target, draft, prompts, controllers("fixed:4", 2), DecodeConfig(40))
    for row in out.rows:
        assert sum(row.produced) == row.new_tokens == 40
        assert len(row.step_s) == len(row.draft_s) == len(row.verify_s) == row.steps
        assert row.wall_s == pytest.approx(row.prefill_s + sum(row.step_s))
    assert out.steps == len(out.batch_sizes) == len(out.gammas) == len(out.draft_forwards)
    assert out.wall_s == pytest.approx(out.prefill_s + sum(out.step_s))
    assert out.new_tokens == 80 and out.decode_tokens == 80 - sum(row.produced[0] for row in out.rows)
    assert out.decode_tokens_per_s == pytest.approx(out.decode_tokens / sum(out.step_s[1:]))
    for s, gamma in enumerate(out.gammas):  # the step's gamma is its widest row's; fixed:4 drafts 4 in one
        assert gamma == max(row.gammas[s] for row in out.rows if s < row.steps) == out.draft_forwards[s]


def test_sampling_is_reproducible_with_a_seed():
    target = tiny_target()
    draft = perturbed_draft(target, 0.3)
    prompts = [list(range(3, 15)), list(range(30, 38)), [7]]

    def run(seed: int, spec: str) -> list[list[int]]:
        config = DecodeConfig(max_new_tokens=N, temperature=1.0, top_p=0.95, seed=seed)
        out = speculative_generate_batch(target, draft, prompts, controllers(spec, 3), config)
        assert out.acceptance_rate > 0
        return [row.token_ids for row in out.rows]

    for spec in ["fixed:4", "entropy:1.5"]:
        first = run(7, spec)
        assert all(len(tokens) == N for tokens in first)
        assert run(7, spec) == first
        assert run(8, spec) != first


def test_batch_of_one_equals_the_loop():
    """One row, greedy: the tokens and per-step statistics of speculative_generate."""
    target = tiny_target()
    draft = perturbed_draft(target, 0.04)
    ids = list(range(3, 20))
    for spec in ["fixed:4", "heuristic", "threshold:0.4"]:
        config = DecodeConfig(max_new_tokens=N)
        alone = speculative_generate(target, draft, ids, parse_controller(spec, 8), config)
        (row,) = speculative_generate_batch(target, draft, [ids], controllers(spec, 1), config).rows
        assert (row.token_ids, row.gammas, row.accepts) == (alone.token_ids, alone.gammas, alone.accepts)


def test_without_a_draft_only_none_runs():
    target = tiny_target()
    prompts = [list(range(3, 15)), list(range(30, 38))]
    out = speculative_generate_batch(target, None, prompts, controllers("none", 2), DecodeConfig(N))
    assert [row.token_ids for row in out.rows] == [greedy_reference(target, ids, N) for ids in prompts]
    with pytest.raises(SpeckvError, match="no draft model"):
        speculative_generate_batch(target, None, prompts, controllers("fixed:2", 2), DecodeConfig(N))


@pytest.mark.parametrize(
    ("prompts", "n_controllers", "match"),
    [
        ([], 0, "no prompts"),
        ([[5, 6], []], 2, "prompt 1 of 2 is empty"),
        ([[5, 6], [7]], 1, "1 controllers for 2 prompts"),
    ],
)
def test_bad_input_is_one_clear_error(prompts, n_controllers, match):
    target = tiny_target()
    with pytest.raises(SpeckvError, match=match):
        speculative_generate_batch(
            target, target, prompts, controllers("fixed:2", n_controllers), DecodeConfig(N)
        )


def test_shared_controllers_and_feature_drafts_are_refused():
    target = tiny_target()
    shared = parse_controller("heuristic", 8)
    with pytest.raises(SpeckvError, match="its own controller"):
        speculative_generate_batch(target, target, [[5], [6]], [shared, shared], DecodeConfig(N))
    from speckv.profiling.feature_draft import FeatureDraft, FeatureDraftConfig

    feature_draft = FeatureDraft(FeatureDraftConfig.from_target(target.config, head_size=16))
    with pytest.raises(SpeckvError, match="feature draft"):
        speculative_generate_batch(
            target, feature_draft, [[5], [6]], controllers("fixed:2", 2), DecodeConfig(N)
        )


def test_row_forward_keeps_each_row_apart():
    """RowCache: rows fed different numbers of tokens, then rolled back by different amounts, give each
    row's batch-1 logits (fp32, within float rounding of the batched kernels)."""
    from speckv.profiling.kv_cache import forward
    from speckv.profiling.row_cache import RowCache, row_forward
    from transformers import DynamicCache

    target = tiny_target()
    seqs = [list(range(5, 17)), list(range(30, 35)), list(range(60, 69))]
    cache = RowCache(target.config, 3)
    with torch.inference_mode():
        row_forward(target, cache, [s[:4] for s in seqs], all_logits=True)
        row_forward(target, cache, [[99, 98, 97], [], [seqs[2][4]]], all_logits=False)  # junk to roll back
        cache.lengths = [4, 4, 5]
        logits = row_forward(target, cache, [s[4:] if i != 2 else s[5:] for i, s in enumerate(seqs)], True)
        for i, ids in enumerate(seqs):
            alone = DynamicCache(config=target.config)
            held = 4 if i != 2 else 5
            forward(target, ids[:held], alone, target.device, all_logits=True)
            want = forward(target, ids[held:], alone, target.device, all_logits=True)
            torch.testing.assert_close(logits[i, : len(want)], want, atol=1e-4, rtol=1e-4)
