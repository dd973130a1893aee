"""Per-decision overhead of the MLP controller and its forward alone, on an export:

python benchmarks/bench_overhead.py [--export artifacts/predictor/export] [--calls 20000]
"""

from __future__ import annotations

import argparse

import numpy as np
from speckv.predictor.overhead import decision_ms, per_call_ms
from speckv.predictor.runtime import load_export


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export", default="artifacts/predictor/export", help="predictor export directory")
    parser.add_argument("--calls", type=int, default=20000)
    args = parser.parse_args()
    predictor = load_export(args.export)
    x = np.random.default_rng(1).random(len(predictor.features))
    per_decision = decision_ms(predictor, args.calls)
    forward_ms = per_call_ms(lambda i: predictor.predict_one(x), args.calls)
    calibration = predictor.calibration["kind"]
    print(f"export: {args.export} ({len(predictor.features)} features, calibration {calibration})")
    print(f"per-decision overhead (keep_drafting): {per_decision:.4f} ms  (goal <= 0.02 ms; paper 0.34 ms)")
    print(f"MLP forward alone (predict_one):       {forward_ms:.4f} ms")


if __name__ == "__main__":
    main()
