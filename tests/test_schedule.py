"""The exported speculation schedule: vLLM's inclusive batch-size ranges and transformers' settings."""

from __future__ import annotations

import pytest
from speckv.predictor.evaluation.schedule import batch_ranges, transformers_settings, vllm_fragment
from speckv.profiling.errors import SpeckvError


def test_ranges_run_from_each_measured_size_to_the_next_and_merge_equal_neighbours():
    assert batch_ranges({1: 3, 2: 3, 4: 2, 8: 2, 16: 0}) == [[1, 3, 3], [4, 15, 2], [16, 16, 0]]
    assert batch_ranges({4: 1}) == [[4, 4, 1]]
    assert batch_ranges({1: 2, 4: 2}) == [[1, 4, 2]]
    with pytest.raises(SpeckvError, match="batch sizes >= 1"):
        batch_ranges({0: 2})
    with pytest.raises(SpeckvError):
        batch_ranges({})


def test_vllm_gets_the_most_tokens_and_the_schedule_or_nothing():
    fragment = vllm_fragment({1: 4, 4: 2, 8: 0})
    assert fragment == {
        "num_speculative_tokens": 4,
        "num_speculative_tokens_per_batch_size": [[1, 3, 4], [4, 7, 2], [8, 8, 0]],
    }
    assert vllm_fragment({1: 0, 8: 0}) is None


def test_transformers_settings_at_batch_one():
    assert transformers_settings(3, 0.45) == {
        "num_assistant_tokens": 3,
        "num_assistant_tokens_schedule": "constant",
        "assistant_confidence_threshold": 0.45,
    }
    assert transformers_settings(2, None) == {
        "num_assistant_tokens": 2,
        "num_assistant_tokens_schedule": "constant",
    }
    assert transformers_settings(0, 0.5) == {}
