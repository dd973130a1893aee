"""Thin stage CLIs over the profiling, predictor and data libraries; `speckv` is the one entry point."""
