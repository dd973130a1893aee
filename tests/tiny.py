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


def mostly_bigram_target(seed: int = 0, vocab_size: int = 128, mixing: float = 0.02) -> LlamaForCausalLM:
    """A tiny target whose next token depends mostly on the current one: its layers write into the residual
    stream at `mixing` scale, so a one-layer feature draft can learn it in a few steps (a random target's
    continuations carry no pattern a draft could learn)."""
    model = tiny_target(seed, vocab_size)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(mixing)
            layer.mlp.down_proj.weight.mul_(mixing)
    return model


def perturbed_draft(target: LlamaForCausalLM, noise: float, seed: int = 1) -> LlamaForCausalLM:
    """A draft that agrees with `target` often but not always: its weights plus Gaussian noise."""
    draft = LlamaForCausalLM(copy.deepcopy(target.config))
    draft.load_state_dict(target.state_dict())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * noise * p.std().clamp_min(1e-3))
    return draft.eval()


def save_pair(
    root: Path, noise: float = 0.04, vocab_size: int = 128, chat_template: bool = True
) -> tuple[Path, Path]:
    """A tiny target and a draft that mostly agrees with it, saved with their tokenizer under root/target and
    root/draft (`chat_template=False`: a tokenizer without one, as a base model's)."""
    target = tiny_target(vocab_size=vocab_size)
    draft = perturbed_draft(target, noise)
    tok = char_tokenizer(vocab_size)
    if not chat_template:
        tok.chat_template = None
    paths = root / "target", root / "draft"
    for model, path in zip((target, draft), paths, strict=True):
        model.save_pretrained(path)
        tok.save_pretrained(path)
    return paths


def trained_feature_draft(
    target: LlamaForCausalLM, steps: int = 150, head_size: int = 96, seed: int = 0, prompts: int = 256
):
    """A feature draft for `target` trained a few steps on the target's own greedy responses to random
    prompts (its restricted head keeps `head_size` of the vocabulary, so -inf rows are exercised)."""
    from speckv.data.distill import DistillConfig
    from speckv.data.feature_draft_training import build_feature_draft, train_feature_draft
    from speckv.data.teacher import generate_batch

    gen = torch.Generator().manual_seed(seed)
    rows = [
        {"input_ids": torch.randint(3, target.config.vocab_size, (8,), generator=gen).tolist()}
        for _ in range(48)
    ]
    seqs = generate_batch(target, rows, max_new_tokens=24, pad_id=0, eos_id=EOS_ID)
    counts = torch.bincount(torch.cat([s["tokens"].long() for s in seqs]), minlength=target.config.vocab_size)
    vocab_ids = torch.sort(torch.argsort(counts, descending=True)[:head_size]).values
    torch.manual_seed(seed)
    draft = build_feature_draft(target, vocab_ids, 0, "tiny")
    config = DistillConfig(lr=1e-2, batch_tokens=512, warmup_steps=10, train_autocast="float32", seed=seed)
    train_feature_draft(draft, seqs, config, steps, feature_noise=0.0)
    return draft.eval().requires_grad_(False)
