"""The engine: models, the one decode loop, controllers, signals, kernels, cost model, traces and their
model-free replay. It imports nothing from speckv.data, speckv.predictor or speckv.pipeline."""
