"""Whether a target and a draft can run as a pair, and the local files the pipeline's stages read of them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from speckv.profiling.errors import SpeckvError
from speckv.profiling.models import check_draft, is_feature_draft, load_model, load_tokenizer, resolve_source

__all__ = ["PairFiles", "check_pair", "model_files"]


@dataclass(frozen=True)
class PairFiles:
    """The local files a pair's pipeline stages read, which DVC tracks as their deps."""

    tokenizer: str  # what the target's tokenizer loads from
    target_weights: str
    draft_weights: str
    chat_template: bool  # whether the target's tokenizer has one (else prompts can only be plain text)


def model_files(ref: str, role: str) -> tuple[str, str]:
    """(tokenizer file, weights file) of a model reference: a file inside its directory where it has one, else
    the directory itself; a .gguf file holds both. Names and hub ids resolve to their local directory."""
    source = resolve_source(ref, role)
    base = Path(source.path)
    if source.gguf_file:
        gguf = str(base / source.gguf_file)
        return gguf, gguf
    if not base.is_dir():  # a hub id: its local snapshot
        from huggingface_hub import snapshot_download

        base = Path(snapshot_download(source.path))
    tokenizer, weights = base / "tokenizer.json", base / "model.safetensors"
    return str(tokenizer if tokenizer.is_file() else base), str(weights if weights.is_file() else base)


def check_pair(target: str, draft: str) -> PairFiles:
    """Load both models and their tokenizers on the CPU and refuse a pair that cannot decode together (another
    vocabulary, tokenizers that disagree); return the files its stages depend on."""
    cpu = torch.device("cpu")
    target_model = load_model(target, "target", cpu)
    draft_model = load_model(draft, "draft", cpu)
    check_draft(draft_model, target_model, draft, target)
    target_tokenizer = load_tokenizer(target)
    target_vocab = target_tokenizer.get_vocab()
    if not is_feature_draft(draft_model):  # a feature draft has no tokenizer of its own
        draft_vocab = load_tokenizer(draft).get_vocab()
        if draft_vocab != target_vocab:
            differ = sorted(set(draft_vocab.items()) ^ set(target_vocab.items()))[:3]
            raise SpeckvError(
                f"the tokenizers of target {target!r} and draft {draft!r} disagree (e.g. {differ}): "
                "speculative decoding needs the same token ids for the same text"
            )
    tokenizer, target_weights = model_files(target, "target")
    _, draft_weights = model_files(draft, "draft")
    return PairFiles(tokenizer, target_weights, draft_weights, bool(target_tokenizer.chat_template))
