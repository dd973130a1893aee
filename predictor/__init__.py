"""The acceptance predictor: features, the 16-unit MLP, its stop rule, export, training and the registry.
Evaluation lives in speckv.predictor.evaluation, above it."""
