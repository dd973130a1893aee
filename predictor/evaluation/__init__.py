"""Evaluation: replay and live comparisons of every policy, statistics, the report. Builds on the predictor,
the data and the engine; nothing below imports it."""
