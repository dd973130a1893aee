"""Teacher generation for the distill stage: our shared-prefill loop (`data/teacher.py`: a prompt's greedy
and sampled rows share one prefill) against transformers' `generate()` with a hook on the final norm (what
the stage ran before), on the same planned rows of the real target, side by side in one run:

    python benchmarks/bench_teacher.py --fraction 0.1 --dtype auto

The rows are the stage's own plan (`plan_teacher_rows` over the distill prompts), thinned to a fixed
pseudo-random `--fraction` of its prompts with all their rows, so the mix of tasks, greedy rows and sampled
repeats is the default run's. Both sides use the stage's batch size and response
cap; `generate()` runs greedy and sampled rows in separate calls, batched by prompt length. Both warm up on
4 short rows first; `--order` says which is timed first. Greedy rows
should come out identical (batch composition can flip a near-tie in low precision; the count is printed).
"""

from __future__ import annotations

import argparse
import logging
import time
import zlib
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from speckv.data.distill import DistillConfig, save_dtype
from speckv.data.prompts import load_prompt_file
from speckv.data.teacher import generate_teacher_data, plan_teacher_rows, row_key
from speckv.profiling.cpu import resolve_auto_dtype
from transformers import AutoModelForCausalLM, AutoTokenizer


def hf_generate_rows(
    target: Any, rows: list[dict], config: DistillConfig, pad_id: int, eos_id: int
) -> list[dict[str, Any]]:
    """The reference: `generate()` per temperature group, batched by prompt length, hidden states hooked."""
    out: dict[int, dict] = {}
    for sampled in (False, True):
        idx = [i for i, r in enumerate(rows) if (r.get("sample", 0) > 0) == sampled]
        idx.sort(key=lambda i: len(rows[i]["input_ids"]))
        for b in range(0, len(idx), config.gen_batch_size):
            batch = [rows[i] for i in idx[b : b + config.gen_batch_size]]
            if sampled:
                torch.manual_seed(config.seed * 1_000_003 + zlib.crc32(row_key(batch[0]).encode("utf-8")))
            for i, seq in zip(
                idx[b : b + len(batch)],
                hooked_generate(target, batch, config, pad_id, eos_id, sampled),
                strict=True,
            ):
                out[i] = seq
    return [out[i] for i in range(len(rows))]


@torch.no_grad()
def hooked_generate(
    target: Any, rows: list[dict], config: DistillConfig, pad_id: int, eos_id: int, sampled: bool
) -> list[dict[str, Any]]:
    captured: list[torch.Tensor] = []
    hook = target.model.norm.register_forward_hook(lambda _m, _i, o: captured.append(o.detach()))
    sampling = (
        {"do_sample": True, "temperature": config.sample_temperature, "top_k": 0, "top_p": 1.0}
        if sampled
        else {"do_sample": False}
    )
    try:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, width - len(r["input_ids"]) :] = torch.tensor(r["input_ids"])
            mask[i, width - len(r["input_ids"]) :] = 1
        gen = target.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=config.max_new_tokens,
            pad_token_id=pad_id,
            eos_token_id=eos_id,
            **sampling,
        )
    finally:
        hook.remove()
    hidden = torch.cat(captured, dim=1)
    seqs = []
    for i, r in enumerate(rows):
        n_prompt = len(r["input_ids"])
        response = gen[i, width:]
        ends = (response == eos_id).nonzero()
        n_resp = int(ends[0]) + 1 if len(ends) else len(response)
        seqs.append(
            {
                "tokens": torch.cat([torch.tensor(r["input_ids"]), response[:n_resp]]),
                "hidden": hidden[i, width - n_prompt : width - 1 + n_resp].to(torch.float16),
                "n_prompt": n_prompt,
            }
        )
    return seqs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="models/smollm2-135m-instruct")
    parser.add_argument("--prompts", default="artifacts/prompts/prompts.jsonl")
    parser.add_argument("--fraction", type=float, default=0.1, help="share of the stage's prompts kept")
    parser.add_argument("--dtype", default="auto", help="teacher dtype: auto, float32 or bfloat16")
    parser.add_argument("--order", choices=["generate-first", "shared-first"], default="generate-first")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    config = DistillConfig()
    dtype = resolve_auto_dtype(args.dtype)
    target = AutoModelForCausalLM.from_pretrained(args.target, dtype=save_dtype(dtype, "dtype")).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.target)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos_id = tokenizer.eos_token_id
    distill_rows = load_prompt_file(Path(args.prompts), splits=["distill"])
    plan = plan_teacher_rows(distill_rows, config.sequences_per_task)  # the stage's 600 rows
    keep = sorted({r["prompt_id"] for r in plan}, key=lambda p: zlib.crc32(p.encode("utf-8")))
    keep = set(keep[: max(1, round(args.fraction * len(keep)))])
    rows = [r for r in plan if r["prompt_id"] in keep]
    n_sampled = sum(r["sample"] > 0 for r in rows)

    def shared(batch: list[dict], max_new_tokens: int) -> list[dict]:
        return generate_teacher_data(
            target,
            batch,
            max_new_tokens,
            config.gen_batch_size,
            pad_id,
            eos_id,
            config.sample_temperature,
            config.seed,
        )

    def reference(batch: list[dict], max_new_tokens: int) -> list[dict]:
        return hf_generate_rows(target, batch, replace(config, max_new_tokens=max_new_tokens), pad_id, eos_id)

    methods = {"generate()": reference, "shared prefill": shared}
    order = list(methods) if args.order == "generate-first" else list(reversed(methods))
    for name in order:  # warm-up: kernels and allocator caches before anything is timed
        methods[name](rows[:4], 8)
    results = {}
    for name in order:
        start = time.perf_counter()
        seqs = methods[name](rows, config.max_new_tokens)
        seconds = time.perf_counter() - start
        n_tokens = sum(len(s["tokens"]) - s["n_prompt"] for s in seqs)
        results[name] = (seqs, seconds, n_tokens)
    print(
        f"{len(rows)} rows ({len(rows) - n_sampled} greedy, {n_sampled} sampled) of "
        f"{len({r['prompt_id'] for r in rows})} distill prompts, teacher {dtype}, "
        f"{torch.get_num_threads()} threads, CPU capability {torch.backends.cpu.get_cpu_capability()}"
    )
    for name, (_, seconds, n_tokens) in results.items():
        print(f"{name}: {n_tokens} response tokens in {seconds:.1f} s = {n_tokens / seconds:.1f} tok/s")
    (ref, ref_s, ref_n), (new, new_s, new_n) = results["generate()"], results["shared prefill"]
    greedy = [i for i, r in enumerate(rows) if r["sample"] == 0]
    same = [i for i in greedy if torch.equal(ref[i]["tokens"].long(), new[i]["tokens"].long())]
    diff = max(
        (float((ref[i]["hidden"].float() - new[i]["hidden"].float()).abs().max()) for i in same), default=0.0
    )
    print(f"greedy rows with identical tokens: {len(same)}/{len(greedy)}; max |hidden diff| there {diff:.3g}")
    print(f"ratio (tokens per second, shared prefill / generate()): {(new_n / new_s) / (ref_n / ref_s):.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
