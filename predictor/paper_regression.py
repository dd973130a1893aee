"""The published SpecKV predictor: a step's acceptance rate regressed on aggregates of that step's whole
draft, gamma and the compression. Post-hoc by construction (its inputs exist only after the draft it would
size), so the training stage only scores it, and evaluation.paper runs its closest deployable reading."""

from __future__ import annotations

import numpy as np
import pandas as pd
from speckv.predictor import model
from speckv.predictor.dataset import split_drafts
from speckv.predictor.features import COMPRESSIONS, FEATURES, RUNNING, STEP_KEYS


def paper_step_table(X: np.ndarray, rows: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, pd.Series]:
    """The published features: each step's aggregates over its whole draft + gamma + compression.

    Returns step features, step acceptance rate, and each row's step number to broadcast predictions.
    """
    frame = rows[[*STEP_KEYS, "draft_index", "gamma", "accepted", "labelled"]].reset_index(drop=True)
    step_id = frame.groupby(list(STEP_KEYS), sort=False, observed=True).ngroup()
    last = (
        frame.assign(step_id=step_id)
        .sort_values("draft_index")
        .groupby("step_id")
        .tail(1)
        .sort_values("step_id")
    )
    cols = [FEATURES.index(c) for c in RUNNING] + [FEATURES.index(f"compression={c}") for c in COMPRESSIONS]
    X_steps = np.column_stack([X[last.index.to_numpy()][:, cols], last["gamma"].to_numpy(np.float64)])
    hits = (frame["accepted"] & frame["labelled"]).groupby(step_id).sum().to_numpy()
    return X_steps, hits / last["gamma"].to_numpy(np.float64), step_id


def fit_paper_regression(tokens: pd.DataFrame, spec: model.MLPSpec):
    """(fitted regressor, train step features): fitted on train prompts' full drafts (trace positions as
    fixed:gamma_max steps) of a token frame."""
    X_train, train_rows = split_drafts(tokens, "train")
    X_steps, rate, _ = paper_step_table(X_train, train_rows)
    return model.fit_step_regressor(X_steps, rate, spec), X_steps


def paper_reference(tokens: pd.DataFrame, spec: model.MLPSpec) -> dict[str, float]:
    """The regression fitted on train prompts, scored on test prompts' tokens (every labelled token gets its
    step's predicted rate) and steps."""
    fitted, _ = fit_paper_regression(tokens, spec)
    X_test, test_rows = split_drafts(tokens, "test")
    X_steps, rate, step_id = paper_step_table(X_test, test_rows)
    predicted = np.clip(fitted.predict(X_steps), 0.0, 1.0)
    labelled = test_rows["labelled"].to_numpy(bool)
    token_rate = predicted[step_id.to_numpy()][labelled]
    y = test_rows.loc[labelled, "accepted"].to_numpy(np.float64)
    return {**model.scores(y, token_rate), **model.step_scores(rate, predicted)}
