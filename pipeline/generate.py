"""`speckv generate`: one prompt through the speculative decoding loop, with its statistics."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from speckv.profiling.controllers import CONTROLLER_SPECS, parse_controller
from speckv.profiling.decode import DecodeConfig, speculative_generate
from speckv.profiling.errors import SpeckvError
from speckv.profiling.models import COMPRESSIONS, eos_ids, load_pair, resolve_source

from speckv.api import encode_prompt


def register(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="generate from one prompt with speculative decoding",
        description="Generate from one prompt with speculative decoding and print statistics.",
    )
    p.add_argument("--target", required=True, help="target: HF id, local directory, .gguf file or 'default'")
    p.add_argument(
        "--draft", help="draft: HF id, local directory, .gguf file or 'default' (omit with 'none')"
    )
    p.add_argument("--compression", default="fp32", choices=COMPRESSIONS, help="target compression")
    p.add_argument("--controller", default="fixed:4", help=f"gamma controller: {CONTROLLER_SPECS}")
    p.add_argument("--gamma-max", type=int, default=8, help="most tokens drafted per step")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-file", type=Path, help="file holding the prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: CUDA when present)")
    p.add_argument(
        "--no-cpu-kernels",
        action="store_true",
        help="keep torch's default fp32 linear kernels and bitsandbytes' own int8/nf4 path on CPU (default: few-row kernels, profiling/kernels.py; int8/nf4 weights kept in float32 where bitsandbytes has no native CPU kernel, profiling/quant_kernels.py)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.prompt_file is not None:
        if not args.prompt_file.is_file():
            raise SpeckvError(f"prompt file not found: {args.prompt_file}")
        text = args.prompt_file.read_text()
    else:
        text = args.prompt
    if not text.strip():
        raise SpeckvError("the prompt is empty")
    config = DecodeConfig.checked_from(args)
    controller = parse_controller(args.controller, args.gamma_max, args.compression)
    if controller.name != "none" and not args.draft:
        raise SpeckvError(f"controller {args.controller!r} needs --draft")
    draft = args.draft if controller.name != "none" else None
    if draft is not None:  # a missing named draft fails here, before anything loads or downloads
        resolve_source(draft, "draft")
    pair = load_pair(
        args.target,
        draft,
        args.compression,
        args.device,
        cpu_kernels=not args.no_cpu_kernels,
    )
    prompt_ids = encode_prompt(pair.tokenizer, text, args.chat)
    config = replace(config, eos_token_ids=eos_ids(pair.tokenizer, pair.target))
    result = speculative_generate(pair.target, pair.draft, prompt_ids, controller, config, args.compression)
    text_out = pair.tokenizer.decode(result.token_ids, skip_special_tokens=True)
    if args.json:
        payload = {
            "text": text_out,
            "token_ids": result.token_ids,
            **result.summary(),
            "controller": controller.name,
            "compression": args.compression,
            "gamma_max": args.gamma_max,
            "temperature": args.temperature,
        }
        print(json.dumps(payload))
    else:
        s = result.summary()
        print(text_out)
        print(
            f"\n[{controller.name} | {args.compression}] {s['new_tokens']} tokens in {s['wall_s']:.2f} s "
            f"({s['tokens_per_s']:.1f} tok/s), {s['steps']} steps, acceptance {s['acceptance_rate']:.2f}, "
            f"{s['mean_accepted_per_step']:.2f} accepted/step"
        )
    return 0
