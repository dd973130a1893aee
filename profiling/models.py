"""Loading a target at a compression and a draft at its own dtype, on one device chosen in one place."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from speckv.profiling import plugins
from speckv.profiling.errors import SpeckvError
from speckv.profiling.feature_draft import (
    check_target,
    is_feature_draft,
    is_feature_draft_dir,
    load_feature_draft,
)
from speckv.profiling.invariant import install as install_rowwise
from speckv.profiling.invariant import needs_rowwise

log = logging.getLogger(__name__)

COMPRESSIONS = ("fp32", "fp16", "bf16", "int8", "nf4")
_FLOAT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def pick_device(requested: str | None = None) -> torch.device:
    """CUDA when present, else CPU; `requested` ("cpu", "cuda", "cuda:1") overrides."""
    if requested:
        device = torch.device(requested)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SpeckvError(f"device {requested!r} requested but CUDA is not available")
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels so wall-clock timings mean something (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class ModelSource:
    """Where from_pretrained should look: a hub id or a directory, plus a GGUF file name if any."""

    ref: str
    path: str
    gguf_file: str | None = None


def resolve_source(ref: str, role: str) -> ModelSource:
    """Turn a user reference (a model name such as `default`, HF id, local directory, .gguf file) into a
    ModelSource. Names come from `speckv.models` entry points (`default` fetches the embedded target on first
    use), so the engine resolves them without importing the package that builds them."""
    path = Path(ref).expanduser()
    named = plugins.find(plugins.MODELS, ref) if "/" not in ref and not path.exists() else None
    if named is not None:
        return ModelSource(ref, named(role))
    if ref.endswith(".gguf"):
        if not path.is_file():
            raise SpeckvError(f"{role} GGUF file not found: {ref}")
        return ModelSource(ref, str(path.parent), path.name)
    if path.exists():
        if path.is_dir() and role == "draft" and is_feature_draft_dir(path):
            return ModelSource(ref, str(path))
        if not path.is_dir() or not (path / "config.json").is_file():
            raise SpeckvError(f"{role} {ref!r} is not a transformers model directory (no config.json)")
        return ModelSource(ref, str(path))
    if ref.startswith((".", "/", "~")) or ref.count("/") != 1:
        raise SpeckvError(f"{role} model not found: {ref!r} is neither a local path nor a hub id (org/name)")
    return ModelSource(ref, ref)


def quantization_kwargs(compression: str, device: torch.device) -> dict:
    """from_pretrained keyword arguments that load a model at `compression`."""
    if compression not in COMPRESSIONS:
        raise SpeckvError(f"unknown compression {compression!r}; expected one of {', '.join(COMPRESSIONS)}")
    if compression in _FLOAT_DTYPES:
        return {"dtype": _FLOAT_DTYPES[compression]}
    from transformers import BitsAndBytesConfig

    compute = torch.float32 if device.type == "cpu" else torch.float16
    if compression == "int8":
        # LLM.int8's outlier decomposition picks fp16 columns from the whole input batch, so a row's logits
        # depend on the other rows: a (k+1)-token verify then differs from one-token decoding (measured:
        # 0.06 logit max difference on a tiny Llama) and greedy speculative output stops matching the
        # target's own. Threshold 0 keeps plain row-wise int8, whose layers are batch-invariant; attention is
        # made so too by row-wise attention (profiling/invariant.py), installed in load_pair.
        config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=0.0)
    else:
        config = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute
        )
    return {
        "quantization_config": config,
        "device_map": device.type if device.type == "cpu" else str(device),
        "dtype": compute,
    }


class _DropCastNotice(logging.Filter):
    """bitsandbytes' LLM.int8 logs this on every forward of an fp32 input (179k lines in one profile run)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")


def silence_int8_cast_notice() -> None:
    """Drop only that notice (idempotent); every other bitsandbytes message still shows."""
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _DropCastNotice) for f in logger.filters):
        logger.addFilter(_DropCastNotice())


def load_model(ref: str, role: str, device: torch.device, compression: str | None = None):
    """A causal LM in eval mode. `compression=None` keeps the checkpoint's own dtype (the draft)."""
    from transformers import AutoModelForCausalLM

    source = resolve_source(ref, role)
    if role == "draft" and is_feature_draft_dir(source.path):
        if compression is not None:
            raise SpeckvError(
                f"the feature draft {ref!r} runs at its own dtype; it cannot be loaded at {compression}"
            )
        log.info("loading feature draft %s", source.ref)
        return load_feature_draft(source.path, device)
    kwargs: dict = {"trust_remote_code": False}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    if compression is None:
        kwargs["dtype"] = "auto"
    else:
        kwargs.update(quantization_kwargs(compression, device))
        if compression == "int8":
            silence_int8_cast_notice()
    log.info("loading %s %s (%s)", role, source.ref, compression or "own dtype")
    try:
        model = AutoModelForCausalLM.from_pretrained(source.path, **kwargs)
    except (OSError, ValueError) as exc:
        raise SpeckvError(f"cannot load {role} model {ref!r}: {' '.join(str(exc).split())}") from exc
    if "device_map" not in kwargs:
        model = model.to(device)
    if compression is None and model.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        model = model.float()
    model.eval()
    model.requires_grad_(False)
    return model


def load_tokenizer(ref: str):
    from transformers import AutoTokenizer

    source = resolve_source(ref, "target")
    kwargs: dict = {"trust_remote_code": False}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    try:
        return AutoTokenizer.from_pretrained(source.path, **kwargs)
    except (OSError, ValueError) as exc:
        raise SpeckvError(f"cannot load the tokenizer of {ref!r}: {' '.join(str(exc).split())}") from exc


def vocab_size(model) -> int:
    if is_feature_draft(model):
        return model.config.vocab_size
    return int(model.get_output_embeddings().weight.shape[0])


@dataclass
class ModelPair:
    target: object
    draft: object | None
    tokenizer: object
    compression: str
    device: torch.device
    target_ref: str
    draft_ref: str | None
    # few-row CPU kernels: none (not asked for, or not a CPU), else kernels.plan's full / lean / off
    kernels: str = "none"


DRAFT_COMPRESSION_HELP = (
    "null: the draft's own dtype; same: the target's compression; or one of " + ", ".join(COMPRESSIONS)
)


def draft_compression_for(setting: str | None, compression: str) -> str | None:
    """The draft's compression beside a target at `compression`, from a config's `draft_compression`."""
    if setting is None:
        return None
    if setting == "same":
        return compression
    if setting not in COMPRESSIONS:
        raise SpeckvError(f"draft_compression {setting!r} is not valid ({DRAFT_COMPRESSION_HELP})")
    return setting


def load_pair(
    target: str,
    draft: str | None,
    compression: str = "fp32",
    device: str | None = None,
    cpu_kernels: bool = True,
    draft_compression: str | None = None,
) -> ModelPair:
    """Target at `compression`, draft (optional) at its own dtype, refusing pairs with different vocabularies.

    `draft_compression` loads the draft compressed too (None: its own dtype, as the pipeline runs it).
    `cpu_kernels` routes fp32 linear layers on CPU through few-row kernels (profiling/kernels.py) in both
    models, and keeps int8/nf4 weights in float32 where bitsandbytes has no native CPU kernel
    (profiling/quant_kernels.py, bit-identical outputs); every policy, the target-alone baseline and
    transformers' generate share them."""
    if compression not in COMPRESSIONS:
        raise SpeckvError(f"unknown compression {compression!r}; expected one of {', '.join(COMPRESSIONS)}")
    dev = pick_device(device)
    if compression in ("int8", "nf4") and dev.type not in ("cpu", "cuda"):
        raise SpeckvError(f"compression {compression} needs a CPU or CUDA device, not {dev}")
    if compression == "fp16" and dev.type == "cpu":
        log.warning("fp16 on CPU is slow and less exact; fp32 or bf16 suit a CPU better")
    target_model = load_model(target, "target", dev, compression)
    draft_model = load_model(draft, "draft", dev, draft_compression) if draft else None
    if draft_model is not None:
        check_draft(draft_model, target_model, draft, target)
    if needs_rowwise(compression, dev):
        install_rowwise(target_model)
        log.info("%s target on %s: row-wise attention, so verifying equals decoding", compression, dev.type)
    mode = install_kernels([target_model, draft_model]) if cpu_kernels and dev.type == "cpu" else "none"
    return ModelPair(target_model, draft_model, load_tokenizer(target), compression, dev, target, draft, mode)


def install_kernels(new: list, beside: list | tuple = ()) -> str:
    """Few-row CPU kernels on the `new` models, planned (kernels.plan) over everything held in memory: `new`
    and the models already loaded `beside` them. Returns the plan: full, lean or off."""
    from speckv.profiling import kernels, quant_kernels

    quant = quant_kernels.copy_bytes(new)
    mode, held, copy = kernels.plan([*beside, *new], extra=quant)
    if mode == "off":
        log.warning(
            "no few-row CPU kernels: the models hold %.1f GB and one copy of their fp32 weights would not "
            "fit beside them",
            held / 1e9,
        )
        return mode
    lean = mode == "lean"
    patched = sum(kernels.install(m, lean) for m in new if m is not None)
    quantized = sum(quant_kernels.install(m) for m in new if m is not None)
    if quantized:
        log.info(
            "%d int8/NF4 layers keep their float32 weight (%.1f GB): bitsandbytes has no native CPU kernel "
            "here and would convert it on every call (profiling/quant_kernels.py)",
            quantized,
            quant / 1e9,
        )
    log.info(
        "few-row CPU kernels (%s: %.1f GB of copies) on %d fp32 linear layers",
        mode,
        (1 if lean else 2) * copy / 1e9,
        patched,
    )
    return mode


def check_draft(draft_model, target_model, draft_ref: str, target_ref: str) -> None:
    """Refuse a draft that cannot serve this target: another vocabulary, or a feature draft of another target."""
    tv, dv = vocab_size(target_model), vocab_size(draft_model)
    if tv != dv:
        raise SpeckvError(
            f"draft and target do not share a vocabulary: target {target_ref!r} has {tv} tokens, "
            f"draft {draft_ref!r} has {dv}"
        )
    if is_feature_draft(draft_model):
        check_target(draft_model, target_model)


def standalone_assistant(pair: ModelPair, ref: str, pair_draft_ref: str | None, cpu_kernels: bool = True):
    """The draft transformers' assisted generation runs beside `pair`: `ref` loaded like the pair's draft (its
    own dtype, the same CPU kernels), or the pair's own draft when `ref` names it. transformers can run only a
    standalone causal LM, so a feature draft is refused with the way out."""
    if ref == pair_draft_ref:
        model = pair.draft
    else:
        model = load_model(ref, "draft", pair.device)
        check_draft(model, pair.target, ref, pair.target_ref)
        if cpu_kernels and pair.device.type == "cpu" and not is_feature_draft(model):
            install_kernels([model], beside=(pair.target, pair.draft))
    if model is None or is_feature_draft(model):
        raise SpeckvError(
            f"transformers' assisted generation needs a standalone draft, not {ref!r}: name one as the "
            "transformers draft (evaluate.hf_draft, e.g. default-standalone)"
        )
    return model


def eos_ids(tokenizer, model) -> tuple[int, ...]:
    """Every token that ends generation: the tokenizer's EOS and the model's generation_config EOS ids."""
    ids = set()
    for source in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(source)
    return tuple(sorted(ids))


def model_fingerprint(ref: str, role: str) -> dict[str, str]:
    """Where a model came from and a sha256 over its weight files, for artifact metadata."""
    import hashlib

    source = resolve_source(ref, role)
    path = Path(source.path)
    digest = hashlib.sha256()
    files = [path / source.gguf_file] if source.gguf_file else sorted(path.glob("*.safetensors"))
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                digest.update(chunk)
    return {"ref": ref, "path": str(path), "sha256": digest.hexdigest() if files else "unavailable (hub id)"}
