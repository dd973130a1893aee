"""Recorder hook for the decode loop: turns each StepOutcome into token rows and a step row."""

from __future__ import annotations

import pyarrow as pa
from speckv.profiling.generation import StepOutcome
from speckv.profiling.schema import STEP_SCHEMA, TOKEN_SCHEMA
from speckv.profiling.signals import SIGNALS, RunningStats


class TableRecorder:
    """Accumulates rows in columnar lists; `run` holds the identifying columns (prompt_id, task, ...)."""

    def __init__(self, run: dict[str, str], prompt_len: int) -> None:
        self.run = run
        self.prompt_len = prompt_len
        self.tokens: dict[str, list] = {f.name: [] for f in TOKEN_SCHEMA}
        self.steps: dict[str, list] = {f.name: [] for f in STEP_SCHEMA}
        self._stats = RunningStats()

    def record_step(self, outcome: StepOutcome) -> None:
        ctx = outcome.ctx
        gamma = len(outcome.signals)
        self._stats.reset()
        t = self.tokens
        for i, sig in enumerate(outcome.signals):
            for key, value in self.run.items():
                t[key].append(value)
            t["step"].append(ctx.step)
            t["draft_index"].append(i)
            t["gamma"].append(gamma)
            t["position"].append(sig.position)
            t["new_index"].append(sig.position - self.prompt_len)
            for name in SIGNALS:
                t[name].append(getattr(sig, name))
            for key, value in self._stats.update(sig).items():
                t[key].append(value)
            t["prev_gamma"].append(ctx.prev_gamma)
            t["prev_accepted"].append(ctx.prev_accepted)
            t["target_top1"].append(ctx.target_top1)
            t["target_entropy"].append(ctx.target_entropy)
            t["target_recent"].append(ctx.target_recent)
            t["accepted"].append(i < outcome.accepted)
            t["labelled"].append(i <= outcome.accepted)
            t["accept_prob"].append(outcome.accept_probs[i] if outcome.accept_probs is not None else None)
            t["draft_ms"].append(outcome.draft_ms[i])
        s = self.steps
        for key, value in self.run.items():
            s[key].append(value)
        s["step"].append(ctx.step)
        s["position"].append(ctx.position)
        s["gamma"].append(gamma)
        s["accepted"].append(outcome.accepted)
        s["produced"].append(outcome.produced)
        s["target_token"].append(outcome.target_token)
        s["prev_gamma"].append(ctx.prev_gamma)
        s["prev_accepted"].append(ctx.prev_accepted)
        s["target_top1"].append(ctx.target_top1)
        s["target_entropy"].append(ctx.target_entropy)
        s["target_recent"].append(ctx.target_recent)
        s["draft_ms"].append(sum(outcome.draft_ms))
        s["verify_ms"].append(outcome.verify_ms)

    def token_table(self) -> pa.Table:
        return pa.table(self.tokens, schema=TOKEN_SCHEMA)

    def step_table(self) -> pa.Table:
        return pa.table(self.steps, schema=STEP_SCHEMA)
