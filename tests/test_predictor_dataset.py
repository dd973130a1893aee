import numpy as np
import pytest
from predictor_synthetic import token_frame
from speckv.predictor.dataset import build_splits, token_labels
from speckv.profiling.errors import SpeckvError


@pytest.fixture(scope="module")
def frame():
    return token_frame(seed=2, steps=3)


def test_prompt_splits(frame):
    splits = build_splits(frame)
    prompts = {name: set(s.rows["prompt_id"]) for name, s in splits.items()}
    assert prompts["train"] and prompts["dev"] and prompts["test"]
    assert not prompts["train"] & prompts["dev"] and not prompts["train"] & prompts["test"]
    assert not prompts["dev"] & prompts["test"]
    for s in splits.values():
        assert s.rows["labelled"].all() and set(np.unique(s.y)) <= {0.0, 1.0}


def test_sampling_labels_are_acceptance_probabilities(frame):
    rows = frame.head(5).assign(mode="sampling", accept_prob=[0.1, 0.2, 0.3, 0.4, 0.5])
    np.testing.assert_allclose(token_labels(rows), [0.1, 0.2, 0.3, 0.4, 0.5], rtol=1e-6)


def test_nan_features(frame):
    bad = frame.copy()
    bad.loc[bad.index[bad["split"] == "dev"][0], "margin"] = np.nan
    with pytest.raises(SpeckvError, match="margin"):
        build_splits(bad)


def test_empty_split(frame):
    with pytest.raises(SpeckvError, match="'dev'"):
        build_splits(frame[frame["split"] != "dev"])


def test_prompt_in_two_splits(frame):
    bad = frame.copy()
    bad.loc[(bad["prompt_id"] == "train-0") & (bad["compression"] == "int8"), "split"] = "test"
    with pytest.raises(SpeckvError, match="more than one split"):
        build_splits(bad)
