"""SpecKV: learn when the draft should stop drafting, and measure whether it pays.

The package installs the repository's folders as one namespace: `speckv.profiling` (the engine: models,
the decode loop, controllers, signals, cost model, replay), `speckv.data` (prompts, the default pair,
distillation), `speckv.predictor` (the acceptance MLP, its stop rule, `speckv.predictor.evaluation`) and
`speckv.pipeline` (the `speckv` CLI). Layers point one way: profiling <- data, predictor <- evaluation <-
pipeline (checked by tests/test_layers.py).

The public surface below is imported lazily, so `import speckv` stays cheap until it is used:

    pair = speckv.load_pair("default", "default", compression="fp32")
    speckv.generate(pair, "Explain KV caches.", controller="mlp:artifacts/predictor/export").text
    target.generate(**inputs, custom_generate=speckv.assisted(draft, "mlp:artifacts/predictor/export"))

`speckv.assisted(draft, controller)` (speckv/hf.py) plugs the same loop and controllers into transformers'
`generate()` as its `custom_generate`, in place of `assistant_model=draft`.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "load_pair": "speckv.api",
    "load_draft": "speckv.api",
    "controller": "speckv.api",
    "generate": "speckv.api",
    "encode_prompt": "speckv.api",
    "Generation": "speckv.api",
    "SpeckvError": "speckv.profiling.errors",
    "register_generator": "speckv.serving_registry",
    "assisted": "speckv.hf",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'speckv' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
