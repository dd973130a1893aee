"""transformers `generate()` with SpecKV's controllers: one argument instead of `assistant_model=`.

    out = target.generate(**inputs, max_new_tokens=64, assistant_model=draft)              # transformers
    out = target.generate(**inputs, max_new_tokens=64,
                          custom_generate=speckv.assisted(draft, "mlp:artifacts/predictor/export"))

`generate()` accepts a callable `custom_generate`: it prepares the generation config, the logits processors
and the stopping criteria as usual, then calls ours instead of its own decoding method. It does not forward
`assistant_model` (nor `streamer`) to a callable, so the draft rides inside the object `assisted` returns.

Which loop. The callable runs the engine's one decode loop, `speckv.profiling.decode.speculative_generate`,
not transformers' `_assisted_decoding`. That loop is where the Controller protocol lives: a per-token stop
question with the draft's signals (`keep_drafting`), trimming the failed token before the verify (`submit`),
the target's confidence and the compression in StepContext, which the learned `mlp:` rule needs; transformers'
candidate generator only takes a token count per step. It is also the loop every profile, trace and
evaluation number was measured with, and its losslessness is tested (tests/test_decode.py): greedy output
equals the target's own greedy `generate()`, sampling keeps the target's distribution (Leviathan et al.).
Sampled tokens are not the ones transformers' own sampler would draw (the random numbers are used
differently), only the same law.

What is read from `generate()`: the length limit (`max_new_tokens`, or `max_length` when that is what is set:
transformers turns both into one MaxLengthCriteria), the EOS ids (`eos_token_id`, int or list, falling back
to the model's generation_config as transformers does: the EosTokenCriteria it builds), greedy or sampling
(`do_sample`; sampling takes temperature / top-k / top-p from the TemperatureLogitsWarper, TopKLogitsWarper
and TopPLogitsWarper transformers prepared, so its defaults such as top_k=50 hold too) and
`return_dict_in_generate` (a GenerateDecoderOnlyOutput whose `sequences` are prompt + generated tokens).
Seed: `assisted(..., seed=N)` fixes every call's sampling; without it each call draws its seed from torch's
default generator, so `torch.manual_seed(s)` before `generate()` makes sampling reproducible, as in transformers.

What is refused, with a GenerateError (a SpeckvError and a ValueError) naming it: batches (batch size > 1,
`num_return_sequences` > 1), beam search (`num_beams` > 1), attention masks with padding, custom position
ids, `inputs_embeds` and other model inputs, a non-empty cache passed in, any logits processor or stopping
criterion other than the ones above (repetition penalty, min_new_tokens, bad words, stop strings, max_time,
...: each would change the distribution or the stop, and the loop does not apply them), per-token outputs
(`output_scores`, `output_logits`, attentions, hidden states), a streamer, encoder-decoder models, a draft
with a different vocabulary or on another device, and an `assistant_model` other than the draft.

Compression. The target's compression is read from the model: a bitsandbytes `quantization_config` (8-bit:
`int8`, 4-bit NF4: `nf4`) or its float dtype (`fp32`, `fp16`, `bf16`); StepContext.compression and the
`mlp:` rule's per-compression costs use it (the controller is built per compression on first use). An int8 or
NF4 target on CPU gets row-wise attention installed on it (profiling/invariant.py, idempotent, as `load_pair`
does), so a verify pass computes each position as one-token decoding does and greedy output stays equal to
the target's own. This changes the user's model in place: batch-1 passes of up to 16 tokens run one SDPA call
per row; everything else keeps SDPA.
"""

from __future__ import annotations

import inspect
import logging
import sys

import torch

from speckv.profiling import plugins
from speckv.profiling.controllers import Controller, parse_controller
from speckv.profiling.decode import DecodeConfig, GenerationResult, speculative_generate
from speckv.profiling.errors import SpeckvError
from speckv.profiling.feature_draft import check_target, is_feature_draft
from speckv.profiling.invariant import NAME as ROWWISE
from speckv.profiling.invariant import install as install_rowwise
from speckv.profiling.invariant import needs_rowwise
from speckv.profiling.models import vocab_size

__all__ = ["AssistedGenerate", "GenerateError", "assisted", "detect_compression"]

log = logging.getLogger(__name__)

_FLOAT_COMPRESSIONS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_SAMPLING_WARPERS = ("TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper")
_HARMLESS_PROCESSORS = ("LogitNormalization",)  # log-softmax: changes no distribution, no argmax
_STOPPING = ("MaxLengthCriteria", "EosTokenCriteria")
_MODEL_INPUTS = ("attention_mask", "position_ids", "logits_to_keep", "use_cache", "cache", "past_key_values")
_OUTPUTS = ("output_scores", "output_logits", "output_attentions", "output_hidden_states")


class GenerateError(SpeckvError, ValueError):
    """A `generate()` argument that `speckv.assisted` cannot honour."""


def detect_compression(model) -> str:
    """The compression name of a loaded model: `int8` / `nf4` (bitsandbytes) or `fp32` / `fp16` / `bf16`."""
    qc = getattr(model.config, "quantization_config", None)
    if qc is not None:
        d = qc if isinstance(qc, dict) else qc.to_dict()
        method = d.get("quant_method", "")
        method = str(getattr(method, "value", method))
        if method != "bitsandbytes":
            raise GenerateError(
                f"target quantized with {method!r}: only bitsandbytes int8 and nf4 are supported"
            )
        if d.get("load_in_8bit") or d.get("_load_in_8bit"):
            if d.get("llm_int8_threshold", 0.0):
                log.warning(
                    "int8 target with llm_int8_threshold=%s: its outlier decomposition makes a verify pass "
                    "differ from one-token decoding, so greedy output may differ from the target's own; "
                    "load it with llm_int8_threshold=0.0 (as speckv.load_pair does)",
                    d["llm_int8_threshold"],
                )
            return "int8"
        if d.get("load_in_4bit") or d.get("_load_in_4bit"):
            kind = d.get("bnb_4bit_quant_type", "fp4")
            if kind != "nf4":
                raise GenerateError(f"4-bit target with bnb_4bit_quant_type={kind!r}: only nf4 is supported")
            return "nf4"
        raise GenerateError("target has a bitsandbytes quantization_config that is neither 8-bit nor 4-bit")
    if getattr(model, "is_loaded_in_8bit", False):
        return "int8"
    if getattr(model, "is_loaded_in_4bit", False):
        return "nf4"
    try:
        return _FLOAT_COMPRESSIONS[model.dtype]
    except KeyError:
        raise GenerateError(f"target dtype {model.dtype} is not fp32, fp16, bf16, int8 or nf4") from None


def _generate_frame_locals(model) -> dict:
    """The locals of the `GenerationMixin.generate` call that called us, or {} when called directly.

    transformers passes neither `streamer` nor `assistant_model` to a custom_generate callable; looking them
    up here turns a silently ignored argument into a clear error."""
    from transformers.generation.utils import GenerationMixin

    code = inspect.unwrap(GenerationMixin.generate).__code__
    frame = sys._getframe(2)
    try:
        for _ in range(10):
            if frame is None:
                return {}
            if frame.f_code is code and frame.f_locals.get("self") is model:
                return dict(frame.f_locals)
            frame = frame.f_back
        return {}
    finally:
        del frame


def _names(items) -> list[str]:
    return [type(x).__name__ for x in items]


class AssistedGenerate:
    """A `custom_generate` callable: speculative decoding of one sequence with `draft` and a controller.

    The controller is built from its spec once per target compression and reused (its per-sequence state is
    reset at every call), so one object serves many calls, one at a time. `last_result` holds the most
    recent call's GenerationResult (per-step drafted / accepted counts, wall time)."""

    def __init__(
        self, draft, controller: str | Controller = "fixed:4", *, gamma_max: int = 8, seed: int | None = None
    ) -> None:
        if gamma_max < 1:
            raise GenerateError(f"gamma_max must be >= 1, got {gamma_max}")
        self.draft = draft
        self.spec = controller
        self.gamma_max = gamma_max
        self.seed = seed
        self._controllers: dict[str, Controller] = {}  # per target compression (what `mlp:` rules need)
        self._shared: Controller | None = None  # a Controller object, or a built-in kind (no compression)
        self.last_result: GenerationResult | None = None
        if isinstance(controller, str):
            kind = controller.strip().partition(":")[0]
            if plugins.find(plugins.CONTROLLERS, kind) is None:  # built-in kinds: a bad spec fails here
                self._shared = parse_controller(controller, gamma_max, "fp32")
        elif isinstance(controller, Controller):
            self._shared = controller
        else:
            raise GenerateError(f"controller must be a spec string or a Controller, got {type(controller)}")

    def __repr__(self) -> str:
        name = self.spec if isinstance(self.spec, str) else self.spec.name
        return f"speckv.assisted(draft={type(self.draft).__name__}, controller={name!r}, gamma_max={self.gamma_max})"

    def controller(self, compression: str) -> Controller:
        """The controller for a target at `compression` (plugins such as `mlp:` are built per compression)."""
        if self._shared is not None:
            return self._shared
        if compression not in self._controllers:
            self._controllers[compression] = parse_controller(self.spec, self.gamma_max, compression)
        return self._controllers[compression]

    def __call__(
        self,
        model,
        input_ids: torch.LongTensor,
        logits_processor=None,
        stopping_criteria=None,
        generation_config=None,
        synced_gpus: bool = False,
        streamer=None,
        **model_kwargs,
    ):
        from transformers.generation.utils import GenerateDecoderOnlyOutput

        config = generation_config if generation_config is not None else model.generation_config
        caller = _generate_frame_locals(model)
        streamer = streamer if streamer is not None else caller.get("streamer")
        self._check_call(model, input_ids, config, streamer, caller.get("assistant_model"), model_kwargs)
        temperature, top_k, top_p = self._sampling(config, logits_processor or [])
        prompt = input_ids[0].tolist()
        max_length, eos = self._stopping(config, stopping_criteria or [])
        max_new = max_length - len(prompt)
        if max_new < 1:
            raise GenerateError(
                f"max_length {max_length} leaves no room after the {len(prompt)}-token prompt; "
                "set max_new_tokens instead"
            )

        compression = detect_compression(model)
        if needs_rowwise(compression, model.device) and model.config._attn_implementation != ROWWISE:
            install_rowwise(model)
            log.info("%s target on %s: row-wise attention installed", compression, model.device.type)
        seed = self.seed if self.seed is not None else int(torch.randint(0, 2**62, (1,)))
        decode = DecodeConfig(
            max_new_tokens=max_new,
            gamma_max=self.gamma_max,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            eos_token_ids=eos,
        )
        try:
            decode.validate()
        except SpeckvError as exc:
            raise GenerateError(str(exc)) from None
        result = speculative_generate(
            model, self.draft, prompt, self.controller(compression), decode, compression
        )
        self.last_result = result
        sequences = torch.tensor([prompt + result.token_ids], dtype=input_ids.dtype, device=input_ids.device)
        if config.return_dict_in_generate:
            return GenerateDecoderOnlyOutput(sequences=sequences)
        return sequences

    def _check_call(self, model, input_ids, config, streamer, assistant_model, model_kwargs) -> None:
        if getattr(model.config, "is_encoder_decoder", False):
            raise GenerateError("encoder-decoder models are not supported: decoder-only targets only")
        if streamer is not None:
            raise GenerateError("streamer is not supported: the loop commits several tokens per step")
        if assistant_model is not None and assistant_model is not self.draft:
            raise GenerateError(
                "assistant_model differs from the draft given to speckv.assisted(draft, ...); "
                "drop assistant_model= (the draft rides with custom_generate)"
            )
        if (config.num_beams or 1) > 1:
            raise GenerateError(
                f"beam search (num_beams={config.num_beams}) is not supported; use num_beams=1"
            )
        if (config.num_return_sequences or 1) > 1:
            raise GenerateError(
                f"num_return_sequences={config.num_return_sequences} is not supported: one sequence per call"
            )
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise GenerateError(
                f"batch size {input_ids.shape[0] if input_ids.dim() == 2 else '?'} is not supported: "
                "speculative decoding here runs one sequence (batch size 1) at a time"
            )
        if config.return_dict_in_generate:
            wanted = [name for name in _OUTPUTS if getattr(config, name, False)]
            if wanted:
                raise GenerateError(f"{', '.join(wanted)} not supported: only `sequences` is returned")
        unknown = sorted(k for k, v in model_kwargs.items() if k not in _MODEL_INPUTS and v is not None)
        if unknown:
            raise GenerateError(f"model inputs {unknown} are not supported: input_ids only")
        mask = model_kwargs.get("attention_mask")
        if mask is not None and not bool((mask == 1).all()):
            raise GenerateError("attention masks with padding are not supported: pass one unpadded prompt")
        positions = model_kwargs.get("position_ids")
        expected = torch.arange(input_ids.shape[1], device=input_ids.device)
        if positions is not None and not torch.equal(positions.reshape(-1).to(expected.device), expected):
            raise GenerateError("custom position_ids are not supported: positions run 0..len(prompt) - 1")
        for key in ("cache", "past_key_values"):
            cache = model_kwargs.get(key)
            if cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length() > 0:
                raise GenerateError("a filled cache is not supported: the loop builds its own KV caches")
        if input_ids.shape[1] == 0:
            raise GenerateError("the prompt is empty")
        if self.draft is not None:
            if vocab_size(self.draft) != vocab_size(model):
                raise GenerateError(
                    f"draft and target do not share a vocabulary: target has {vocab_size(model)} tokens, "
                    f"draft has {vocab_size(self.draft)}"
                )
            if self.draft.device != model.device:
                raise GenerateError(
                    f"draft on {self.draft.device} but target on {model.device}: use one device"
                )
            if is_feature_draft(self.draft):
                try:
                    check_target(self.draft, model)
                except SpeckvError as exc:
                    raise GenerateError(str(exc)) from exc

    @staticmethod
    def _sampling(config, processors) -> tuple[float, int, float]:
        """(temperature, top_k, top_p) for DecodeConfig; temperature 0 is greedy."""
        names = _names(processors)
        other = [n for n in names if n not in _SAMPLING_WARPERS + _HARMLESS_PROCESSORS]
        if other:
            raise GenerateError(
                f"logits processors {other} are not supported: they change the target's distribution "
                "beyond temperature / top-k / top-p"
            )
        if len(set(names)) != len(names):
            raise GenerateError(f"logits processors repeat a class: {names}")
        if not config.do_sample:
            return 0.0, 0, 1.0  # temperature, top-k and top-p all keep the argmax
        by_name = {type(p).__name__: p for p in processors}
        order = [n for n in names if n in _SAMPLING_WARPERS]
        if "TopPLogitsWarper" in order and order[-1] != "TopPLogitsWarper":
            raise GenerateError(f"top-p must come after temperature and top-k, got {order}")
        temperature = float(getattr(by_name.get("TemperatureLogitsWarper"), "temperature", 1.0))
        top_k = int(getattr(by_name.get("TopKLogitsWarper"), "top_k", 0))
        top_p_warper = by_name.get("TopPLogitsWarper")
        top_p = float(getattr(top_p_warper, "top_p", 1.0))
        if top_p_warper is not None and top_p_warper.min_tokens_to_keep > 1:
            raise GenerateError("top-p with min_tokens_to_keep > 1 is not supported")
        if temperature <= 0:
            raise GenerateError(f"do_sample=True needs temperature > 0, got {temperature}")
        return temperature, top_k, top_p

    @staticmethod
    def _stopping(config, criteria) -> tuple[int, tuple[int, ...]]:
        """(max_length, EOS ids) from transformers' prepared stopping criteria."""
        names = _names(criteria)
        other = [n for n in names if n not in _STOPPING]
        if other:
            raise GenerateError(
                f"stopping criteria {other} are not supported: only max_new_tokens / max_length and EOS ids"
            )
        lengths = [c.max_length for c in criteria if type(c).__name__ == "MaxLengthCriteria"]
        if config.max_length is not None:
            lengths.append(config.max_length)
        if not lengths:
            raise GenerateError("no length limit: set max_new_tokens")
        eos: set[int] = set()
        for c in criteria:
            if type(c).__name__ == "EosTokenCriteria":
                ids = c.eos_token_id
                eos.update(ids.reshape(-1).tolist() if isinstance(ids, torch.Tensor) else [ids])
        return min(lengths), tuple(sorted(int(i) for i in eos))


def assisted(
    draft, controller: str | Controller = "fixed:4", *, gamma_max: int = 8, seed: int | None = None
) -> AssistedGenerate:
    """`custom_generate=speckv.assisted(draft, "mlp:artifacts/predictor/export")` for `target.generate()`.

    `controller`: a spec (`none`, `fixed:K`, `heuristic`, `threshold:P[+trim]`, `entropy:H[+trim]`,
    `mlp:EXPORT_DIR`, `mlp:models:/NAME@ALIAS`) or a Controller; `gamma_max` caps tokens drafted per step;
    `seed` fixes sampling (None: drawn from torch's default generator at each call)."""
    return AssistedGenerate(draft, controller, gamma_max=gamma_max, seed=seed)
