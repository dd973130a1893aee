"""The predictor's training data: labelled drafted tokens, laid out as the token table's rows (the dense
traces' through `trace_token_frame`), split by prompt.

A token is labelled up to and including its step's first rejection; its label is `accepted` (greedy) or the
acceptance probability min(1, p_target/p_draft) (sampling). Splits come from the rows' per-prompt `split`
column, never from rows, so no prompt is seen in two splits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from speckv.predictor.features import FEATURES, table_features
from speckv.profiling.errors import SpeckvError

SPLITS = ("train", "dev", "test")


@dataclass(frozen=True)
class Split:
    """One split's rows: features, labels, and the table columns replay and grouping need."""

    X: np.ndarray  # (rows, len(FEATURES)) float64
    y: np.ndarray  # (rows,) float64: 0/1 (greedy) or acceptance probability (sampling)
    rows: pd.DataFrame  # the token-table rows, same order as X


def token_labels(rows: pd.DataFrame) -> np.ndarray:
    """Greedy rows: 1.0 if the target accepted the token; sampling rows: its acceptance probability."""
    greedy = (rows["mode"] == "greedy").to_numpy()
    prob = rows["accept_prob"].to_numpy(np.float64, na_value=np.nan)
    return np.where(greedy, rows["accepted"].to_numpy(np.float64), prob)


def check_finite(X: np.ndarray, y: np.ndarray, what: str) -> None:
    bad_features = [FEATURES[j] for j in np.flatnonzero(~np.isfinite(X).all(axis=0))]
    if bad_features:
        raise SpeckvError(f"{what}: NaN or infinite values in feature(s) {bad_features}")
    if not np.isfinite(y).all():
        raise SpeckvError(f"{what}: {int((~np.isfinite(y)).sum())} label(s) are missing (null accept_prob?)")
    if ((y < 0) | (y > 1)).any():
        raise SpeckvError(f"{what}: labels outside [0, 1]")


def check_prompt_splits(tokens: pd.DataFrame) -> None:
    """Each prompt must sit in exactly one split, and only the known splits may appear."""
    unknown = sorted(set(tokens["split"]) - set(SPLITS))
    if unknown:
        raise SpeckvError(f"unknown split name(s) {unknown}; expected {list(SPLITS)}")
    per_prompt = tokens.groupby(["task", "prompt_id"], observed=True)["split"].nunique()
    leaking = per_prompt[per_prompt > 1]
    if not leaking.empty:
        raise SpeckvError(f"{len(leaking)} prompt(s) appear in more than one split, e.g. {leaking.index[0]}")


def build_splits(tokens: pd.DataFrame) -> dict[str, Split]:
    """Features on every drafted row, then the labelled rows of each prompt split."""
    check_prompt_splits(tokens)
    tokens = tokens.reset_index(drop=True)
    # Features need the whole draft (running aggregates), so they are built before unlabelled rows go.
    X_all = table_features(tokens)
    splits = {}
    for name in SPLITS:
        mask = (tokens["split"] == name).to_numpy() & tokens["labelled"].to_numpy(bool)
        if not mask.any():
            raise SpeckvError(f"split {name!r} has no labelled token rows")
        rows = tokens[mask]
        X, y = X_all[mask], token_labels(rows)
        check_finite(X, y, f"split {name!r}")
        splits[name] = Split(X=X, y=y, rows=rows.reset_index(drop=True))
    return splits


def split_drafts(tokens: pd.DataFrame, split: str) -> tuple[np.ndarray, pd.DataFrame]:
    """Features and rows of every drafted token of a split, labelled or not: the input of stop-rule replay."""
    rows = tokens[tokens["split"] == split].reset_index(drop=True)
    if rows.empty:
        raise SpeckvError(f"split {split!r} has no drafted rows")
    X = table_features(rows)
    check_finite(X, np.zeros(len(rows)), f"split {split!r} drafts")
    return X, rows


def trace_token_frame(traces: list) -> pd.DataFrame:
    """Token-table-like rows from dense greedy traces: every position, every draft index up to gamma_max.

    Token j drafted at position i is labelled while the draft had matched the target so far (j <= match_len)
    and accepted iff j < match_len: exact labels, whatever policy would have drafted there. Each position
    is one "step" (step = new_index) of a controller named `trace`, so running aggregates restart per draft.
    """
    from speckv.profiling.signals import SIGNALS

    frames = []
    for t in traces:
        n, g = t.n_new, t.gamma_max
        j = np.tile(np.arange(g), n)
        i = np.repeat(np.arange(n), g)
        match = t.match_len[i]
        frame = {
            "prompt_id": t.prompt_id,
            "task": t.task,
            "split": t.split,
            "compression": t.compression,
            "controller": "trace",
            "mode": "greedy",
            "step": i,
            "draft_index": j,
            "gamma": g,  # as a full-draft (fixed:gamma_max) step from this position
            "position": t.position[i] + j,
            "target_top1": t.target_top1[i],
            "target_entropy": t.target_entropy[i],
            "target_recent": t.target_recent[i],
            "accepted": j < match,
            "labelled": j <= match,
            "accept_prob": np.nan,
        }
        for k, name in enumerate(SIGNALS):
            frame[name] = t.signals[:, :, k].reshape(-1)
        frames.append(pd.DataFrame(frame))
    if not frames:
        raise SpeckvError("no traces to build predictor rows from")
    return pd.concat(frames, ignore_index=True)


def trace_start_frame(traces: list) -> pd.DataFrame:
    """One row per trace position: what is known at step start, and whether the first draft is accepted."""
    frames = [
        pd.DataFrame(
            {
                "prompt_id": t.prompt_id,
                "task": t.task,
                "split": t.split,
                "compression": t.compression,
                "position": t.position,
                "target_top1": t.target_top1,
                "target_entropy": t.target_entropy,
                "target_recent": t.target_recent,
                "first_accepted": t.match_len > 0,
            }
        )
        for t in traces
    ]
    if not frames:
        raise SpeckvError("no traces to build step-start rows from")
    return pd.concat(frames, ignore_index=True)
