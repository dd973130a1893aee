"""The public surface: load a pair at a compression, build a controller, generate.

    import speckv
    pair = speckv.load_pair("default", "default", compression="int8")
    out = speckv.generate(pair, "Write a haiku about caches.", controller="mlp:artifacts/predictor/export")
    print(out.text, out.result.summary())

Controllers are built from spec strings (`none`, `fixed:K`, `heuristic`, `threshold:P[+trim]`,
`entropy:H[+trim]`, `mlp:EXPORT_DIR`, `mlp:models:/NAME@ALIAS`) by the engine's one `parse_controller`.
"""

from __future__ import annotations

from dataclasses import dataclass

from speckv.profiling.controllers import Controller, parse_controller
from speckv.profiling.decode import DecodeConfig, GenerationResult, speculative_generate
from speckv.profiling.errors import SpeckvError
from speckv.profiling.models import ModelPair, eos_ids, load_pair

__all__ = ["Generation", "controller", "encode_prompt", "generate", "load_draft", "load_pair"]


def load_draft(ref: str, device: str | None = None):
    """A draft by reference (`default`, `default-standalone`, a directory, .gguf file or hub id) at its own
    dtype: a feature (EAGLE-style) draft or a transformers causal LM, as `speckv.assisted` takes either."""
    from speckv.profiling.models import load_model, pick_device

    return load_model(ref, "draft", pick_device(device))


def controller(spec: str | Controller, gamma_max: int = 8, compression: str = "fp32") -> Controller:
    """A controller from its spec (a Controller object passes through unchanged)."""
    if isinstance(spec, str):
        return parse_controller(spec, gamma_max, compression)
    return spec


_controller = controller  # `generate` takes an argument of the same name


def encode_prompt(tokenizer, text: str, chat: bool) -> list[int]:
    """Token ids of `text`, wrapped in the tokenizer's chat template as one user turn when `chat`."""
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise SpeckvError("chat requested but the target's tokenizer has no chat template")
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
        )
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)
    return tokenizer(text, add_special_tokens=True)["input_ids"]


@dataclass
class Generation:
    text: str  # the generated text (special tokens skipped)
    result: GenerationResult  # token ids, per-step gammas and acceptances, timings (`.summary()`)


def generate(
    pair: ModelPair,
    prompt: str | list[int],
    controller: str | Controller = "fixed:4",
    *,
    max_new_tokens: int = 128,
    gamma_max: int = 8,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    chat: bool = True,
) -> Generation:
    """Speculative decoding of one prompt (text, chat-wrapped when `chat`, or token ids) with `controller`;
    lossless: greedy output equals the target's own, sampling keeps its distribution."""
    eos = eos_ids(pair.tokenizer, pair.target)
    config = DecodeConfig(max_new_tokens, gamma_max, temperature, top_k, top_p, seed, eos)  # its field order
    config.validate()
    ctrl = _controller(controller, gamma_max, pair.compression)
    if ctrl.name != "none" and pair.draft is None:
        raise SpeckvError(f"controller {ctrl.name!r} drafts tokens but the pair has no draft model")
    ids = list(prompt) if not isinstance(prompt, str) else encode_prompt(pair.tokenizer, prompt, chat)
    if not isinstance(prompt, str) and not all(isinstance(i, int) for i in ids):
        raise SpeckvError("prompt must be text or a list of token ids")
    result = speculative_generate(pair.target, pair.draft, ids, ctrl, config, pair.compression)
    return Generation(pair.tokenizer.decode(result.token_ids, skip_special_tokens=True), result)
