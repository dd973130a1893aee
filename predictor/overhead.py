"""Per-decision overhead of the MLP controller, which the evaluate stage reports: `keep_drafting` (RunningStats
update + feature vector + MLP forward + stop rule) is the work added to each drafted token. Goal <= 0.02 ms
on CPU; the SpecKV paper reports 0.34 ms. benchmarks/bench_overhead.py prints it beside the forward alone.
"""

from __future__ import annotations

import time

import numpy as np
from speckv.predictor.runtime import MLPController
from speckv.profiling.controllers import StepContext
from speckv.profiling.signals import TokenSignals


def per_call_ms(fn, calls: int) -> float:
    """Best of 5 timed batches, in ms per call (best, because other jobs share these CPU cores)."""
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for i in range(calls):
            fn(i)
        best = min(best, (time.perf_counter() - start) / calls)
    return 1000.0 * best


def decision_ms(predictor, calls: int) -> float:
    """ms per drafted token of the MLP controller's decisions (keep_drafting, plus start_step once per
    gamma_max tokens) on `predictor`, over a fixed stream of plausible signals."""
    compression = sorted(predictor.stop_rule["step_ms"])[0]
    gamma_max = int(predictor.stop_rule["gamma_max"])
    controller = MLPController(predictor, gamma_max, compression, name="mlp")
    # step 3 at position 200, 20 tokens generated, 2 of the previous step's 4 drafted tokens accepted
    ctx = StepContext(3, 200, 20, 4, 2, compression, target_top1=0.8, target_entropy=0.7, target_recent=0.8)
    p = np.random.default_rng(0).uniform(0.2, 1.0, 4096)
    tokens = [
        TokenSignals(float(v), float(v), float(v) / 2, float(2 * (1 - v)), i % gamma_max, 200 + i % gamma_max)
        for i, v in enumerate(p)
    ]

    def decide(i: int) -> None:
        if i % gamma_max == 0:
            controller.start_step(ctx)
        controller.keep_drafting(tokens[i % len(tokens)])

    return per_call_ms(decide, calls)
