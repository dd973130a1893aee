"""Tiny random Llama pairs, a character tokenizer and a tiny prompt file, built in-process: no downloads,
seconds on a CPU."""

from __future__ import annotations

import copy
import json
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


def tiny_config(vocab_size: int = 128, hidden: int = 64, layers: int = 2, **overrides) -> LlamaConfig:
    # widths are multiples of 64 so bitsandbytes NF4 runs on a CPU
    settings = dict(
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
    return LlamaConfig(**{**settings, **overrides})


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


def save_word_level_target(path: Path) -> Path:
    """A random 3-layer Llama (64 tokens, tied embeddings) with a word-level tokenizer, saved like the fetched
    target: what the distill stages start from."""
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(61)])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", eos_token="</s>", pad_token="</s>"
    )
    torch.manual_seed(0)
    config = tiny_config(64, 32, 3, tie_word_embeddings=True, pad_token_id=2, max_position_embeddings=2048)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_prompt_file(path: Path) -> Path:
    """A prompt file of two tasks, each with two distill prompts, one dev and one test prompt."""
    rows = []
    for i, (task, split) in enumerate(
        [(t, s) for t in ("code", "math") for s in ("distill", "distill", "dev", "test")]
    ):
        ids = [1] + [3 + (i * 7 + j) % 60 for j in range(4 + i)]
        rows.append(
            {
                "prompt_id": f"{task}/{i}",
                "task": task,
                "split": split,
                "text": "",
                "input_ids": ids,
                "n_tokens": len(ids),
                "orig_tokens": len(ids),
                "truncated": False,
            }
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# Every controller kind on prompts of the character tokenizer: what the lossless tests decode.
CONTROLLERS = ["none", "fixed:1", "fixed:4", "fixed:8", "heuristic", "threshold:0.4", "entropy:1.5"]
PROMPTS = ["def add(a, b):", "The quick brown fox", "x = [i * i for i in range(10)]"]


def greedy_reference(model, ids: list[int], max_new_tokens: int, eos: int | None = None) -> list[int]:
    """The model's own greedy continuation of `ids`, by transformers' generate()."""
    out = model.generate(
        torch.tensor([ids]), do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=0
    )
    return out[0, len(ids) :].tolist()


def assert_greedy_lossless(pair, compression: str) -> None:
    """Every controller's greedy output on every prompt equals the target's own, and the pair both accepts
    and rejects drafted tokens often (or nothing about the caches' rollback was exercised)."""
    from speckv.profiling.controllers import parse_controller
    from speckv.profiling.decode import DecodeConfig, speculative_generate

    tokenizer = char_tokenizer()
    accepted = rejected = 0
    for prompt in PROMPTS:
        ids = tokenizer(prompt)["input_ids"]
        expected = greedy_reference(pair.target, ids, 24)
        for spec in CONTROLLERS:
            result = speculative_generate(
                pair.target,
                pair.draft,
                ids,
                parse_controller(spec, 8),
                DecodeConfig(max_new_tokens=24),
                compression,
            )
            assert result.token_ids == expected, f"{compression} {spec} {prompt!r}"
            accepted += result.accepted
            rejected += result.drafted - result.accepted
    assert accepted > 20 and rejected > 20


def assert_two_token_law(target, draft, vocab: int, runs: int = 1500) -> None:
    """Sampling at temperature 1 with fixed:3 from a fixed prompt: the counts of the first two generated tokens
    over `runs` seeds pass a chi-square test against the target's own law of those two tokens (cells with
    small expected counts pooled, so the approximation holds)."""
    import numpy as np
    from scipy.stats import chisquare
    from speckv.profiling.controllers import parse_controller
    from speckv.profiling.decode import DecodeConfig, speculative_generate

    ids = [5, 9, 13]
    with torch.no_grad():
        first = torch.softmax(target(torch.tensor([ids])).logits[0, -1], -1)
        second_given = torch.softmax(
            target(torch.tensor([ids + [t] for t in range(vocab)])).logits[:, -1], -1
        )
    law = (first[:, None] * second_given).double().numpy()
    law /= law.sum()
    counts = np.zeros((vocab, vocab))
    controller = parse_controller("fixed:3", 8)
    for seed in range(runs):
        config = DecodeConfig(max_new_tokens=2, temperature=1.0, seed=seed)
        result = speculative_generate(target, draft, ids, controller, config)
        counts[result.token_ids[0], result.token_ids[1]] += 1
    expected = law * runs
    big = expected >= 5
    observed = np.append(counts[big], counts[~big].sum())
    assert chisquare(observed, np.append(expected[big], expected[~big].sum())).pvalue > 0.001
