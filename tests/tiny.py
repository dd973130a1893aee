"""Tiny random Llama pairs and a character tokenizer, built in-process: no downloads, seconds on a CPU."""

from __future__ import annotations

import copy
import string
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<bos>", "<eos>"]
EOS_ID = 2
CHAT_TEMPLATE = (
    "{% for m in messages %}<bos>{{ m['role'] }}:{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<bos>assistant:{% endif %}"
)


def char_tokenizer(vocab_size: int = 128) -> PreTrainedTokenizerFast:
    chars = [c for c in string.printable if c not in "\x0b\x0c"]
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars[: vocab_size - len(SPECIALS)])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>"
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_config(vocab_size: int = 128, hidden: int = 64, layers: int = 2) -> LlamaConfig:
    # widths are multiples of 64 so bitsandbytes NF4 runs on a CPU
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=EOS_ID,
        pad_token_id=0,
        tie_word_embeddings=False,
    )


def tiny_target(seed: int = 0, vocab_size: int = 128) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = tiny_config(vocab_size)
    config.initializer_range = 0.2  # peaked logits, so greedy paths are not near-ties everywhere
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = EOS_ID
    model.generation_config.pad_token_id = 0
    return model.eval()


def perturbed_draft(target: LlamaForCausalLM, noise: float, seed: int = 1) -> LlamaForCausalLM:
    """A draft that agrees with `target` often but not always: its weights plus Gaussian noise."""
    draft = LlamaForCausalLM(copy.deepcopy(target.config))
    draft.load_state_dict(target.state_dict())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * noise * p.std().clamp_min(1e-3))
    return draft.eval()


def save_pair(root: Path, noise: float = 0.04, vocab_size: int = 128) -> tuple[Path, Path]:
    target = tiny_target(vocab_size=vocab_size)
    draft = perturbed_draft(target, noise)
    tok = char_tokenizer(vocab_size)
    paths = root / "target", root / "draft"
    for model, path in zip((target, draft), paths, strict=True):
        model.save_pretrained(path)
        tok.save_pretrained(path)
    return paths
