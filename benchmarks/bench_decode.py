"""Decode-loop benchmark on a tiny pair: tokens/s of none, fixed:4 and heuristic, HF generate as a floor
for loop overhead, and the recorder-on / recorder-off ratio. Runs are interleaved and repeated, and the
printed ratios come from the same run, so machine noise hits every variant alike.

    python benchmarks/bench_decode.py [--repeats 7] [--max-new-tokens 96]
    python benchmarks/bench_decode.py --target default --draft default --prompts artifacts/prompts/prompts.jsonl
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from speckv.profiling.controllers import parse_controller
from speckv.profiling.decode import DecodeConfig, speculative_generate
from speckv.profiling.recorder import TableRecorder
from transformers import LlamaConfig, LlamaForCausalLM


def build_pair():
    """A random Llama target (8 layers of width 512, 4,096 tokens) and a draft holding its first layer."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=4096,
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
        initializer_range=0.2,  # peaked logits, so greedy paths are not near-ties everywhere
    )
    target = LlamaForCausalLM(config).eval()
    # layers 1..7 write little into the residual stream, so a draft holding only layer 0 agrees often:
    # a stand-in for a well-distilled draft at ~1/8 of the target's cost
    with torch.no_grad():
        for layer in target.model.layers[1:]:
            layer.self_attn.o_proj.weight.mul_(0.02)
            layer.mlp.down_proj.weight.mul_(0.02)
    draft = copy.deepcopy(target)
    draft.model.layers = draft.model.layers[:1]
    draft.config.num_hidden_layers = 1
    return target, draft


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--target", help="a real target instead of the tiny pair (with --draft, --prompts)")
    parser.add_argument("--draft")
    parser.add_argument("--prompts", help="prompt file; the first dev prompt is used")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.target:
        from speckv.data.prompts import load_prompt_file
        from speckv.profiling.models import load_pair

        pair = load_pair(args.target, args.draft, "fp32")
        target, draft = pair.target, pair.draft
        prompt = load_prompt_file(args.prompts, splits=["dev"], per_task=1)[0]["input_ids"]
    else:
        target, draft = build_pair()
        prompt = list(range(10, 74))
    config = DecodeConfig(max_new_tokens=args.max_new_tokens)

    def spec(name: str, record: bool = False) -> float:
        recorder = (
            TableRecorder(
                {
                    "prompt_id": "b",
                    "task": "b",
                    "split": "b",
                    "compression": "fp32",
                    "controller": name,
                    "mode": "greedy",
                },
                len(prompt),
            )
            if record
            else None
        )
        r = speculative_generate(target, draft, prompt, parse_controller(name, 8), config, recorder=recorder)
        return r.new_tokens / r.wall_s

    def hf_generate() -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = target.generate(
                torch.tensor([prompt]),
                do_sample=False,
                max_new_tokens=args.max_new_tokens,
                min_new_tokens=args.max_new_tokens,
                pad_token_id=0,
            )
        return (out.shape[1] - len(prompt)) / (time.perf_counter() - t0)

    variants = {
        "hf_generate (target alone)": hf_generate,
        "none": lambda: spec("none"),
        "fixed:4": lambda: spec("fixed:4"),
        "heuristic": lambda: spec("heuristic"),
        "fixed:8 recorder off": lambda: spec("fixed:8"),
        "fixed:8 recorder on": lambda: spec("fixed:8", record=True),
    }
    for fn in variants.values():  # warm-up
        fn()
    samples: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            samples[name].append(fn())
    med = {k: statistics.median(v) for k, v in samples.items()}
    accept = speculative_generate(
        target, draft, prompt, parse_controller("fixed:4", 8), config
    ).acceptance_rate
    pair_name = f"{args.target} / {args.draft}" if args.target else "tiny pair: target 8x512, draft 1x512"
    print(
        f"{pair_name} (fixed:4 acceptance {accept:.2f}); "
        f"{args.max_new_tokens} new tokens, median of {args.repeats} interleaved runs, {torch.get_num_threads()} threads"
    )
    for name, value in med.items():
        print(f"  {name:28s} {value:8.1f} tok/s")
    print(
        f"  ratio none / hf_generate            {med['none'] / med['hf_generate (target alone)']:.3f}"
        "  (decode-loop overhead vs transformers)"
    )
    print(f"  ratio fixed:4 / none                {med['fixed:4'] / med['none']:.3f}")
    print(f"  ratio heuristic / none              {med['heuristic'] / med['none']:.3f}")
    print(
        f"  ratio recorder on / off (fixed:8)   {med['fixed:8 recorder on'] / med['fixed:8 recorder off']:.3f}"
        "  (goal >= 0.95)"
    )


if __name__ == "__main__":
    main()
