import numpy as np
import pytest
from predictor_synthetic import token_frame
from speckv.predictor.features import FEATURES, STEP_KEYS, live_features, table_features
from speckv.profiling.controllers import StepContext
from speckv.profiling.errors import SpeckvError
from speckv.profiling.signals import SIGNALS, RunningStats, TokenSignals


@pytest.fixture(scope="module")
def frame():
    return token_frame(seed=1, steps=4)


def test_features_ignore_later_tokens_and_steps(frame):
    before = table_features(frame)
    # Perturb every token from draft index 3 on, and every later step, in one prompt's run.
    run = (frame["prompt_id"] == "train-0") & (frame["compression"] == "fp32")
    future = run & ((frame["draft_index"] >= 3) | (frame["step"] >= 2))
    perturbed = frame.copy()
    for name in SIGNALS:
        perturbed.loc[future, name] = np.float32(0.01)
    perturbed.loc[future, "position"] += 1000
    perturbed.loc[future, "accepted"] = ~perturbed.loc[future, "accepted"]
    perturbed.loc[future, "gamma"] = 1
    after = table_features(perturbed.sample(frac=1.0, random_state=0).sort_index())
    earlier = (~future).to_numpy()
    np.testing.assert_array_equal(before[earlier], after[earlier])
    assert not np.array_equal(before[future.to_numpy()], after[future.to_numpy()])


def test_live_features_match_table(frame):
    table = table_features(frame)
    out = np.empty(len(FEATURES))
    for _, step in frame.groupby(list(STEP_KEYS)):
        stats = RunningStats()
        first = step.iloc[0]
        ctx = StepContext(
            step=int(first["step"]),
            position=int(first["position"]),
            new_tokens=0,
            prev_gamma=int(first["prev_gamma"]),
            prev_accepted=int(first["prev_accepted"]),
            compression=first["compression"],
            target_top1=float(first["target_top1"]),
            target_entropy=float(first["target_entropy"]),
            target_recent=float(first["target_recent"]),
        )
        for index, row in step.sort_values("draft_index").iterrows():
            signals = TokenSignals(
                *(float(row[s]) for s in SIGNALS), int(row["draft_index"]), int(row["position"])
            )
            live = live_features(signals, stats.update(signals), ctx, out)
            np.testing.assert_allclose(live, table[frame.index.get_loc(index)], rtol=1e-12, atol=1e-12)


def test_gamma_is_not_a_feature():
    assert "gamma" not in FEATURES and "new_index" not in FEATURES


def test_unknown_compression_is_rejected(frame):
    bad = frame.assign(compression="q3_k")
    with pytest.raises(SpeckvError, match="q3_k"):
        table_features(bad)
