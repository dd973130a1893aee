"""Teacher data for the distillation (step 1 of the recipe in `data/distill.py`): the target's responses to
the prompts, greedy or sampled, with its final hidden state at every position, cached per row in one file.
"""

from __future__ import annotations

import logging
import time
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from speckv.data.distill import DistillConfig

__all__ = [
    "generate_batch",
    "generate_teacher_data",
    "load_or_generate_teacher",
    "plan_teacher_rows",
    "row_key",
]

log = logging.getLogger(__name__)


def row_key(row: dict) -> str:
    """A teacher row's cache key: its `key` from `plan_teacher_rows`, else (dev/test rows) its prompt id."""
    return row.get("key", row["prompt_id"])


def plan_teacher_rows(rows: list[dict], sequences_per_task: int) -> list[dict]:
    """The teacher sequences to make: per task, a greedy response to each of its first `sequences_per_task`
    prompts, then sampled responses to its prompts in turn until the task has `sequences_per_task`.

    Each row gets `key` (the prompt id, `#s<k>` appended for the k-th sampled repeat) and `sample` (k, 0 for
    the greedy response).
    """
    by_task: dict[str, list[dict]] = {}
    for r in rows:
        by_task.setdefault(r["task"], []).append(r)
    plan = []
    for task_rows in by_task.values():
        for n in range(sequences_per_task):
            r, k = task_rows[n % len(task_rows)], n // len(task_rows)
            plan.append({**r, "key": r["prompt_id"] if k == 0 else f"{r['prompt_id']}#s{k}", "sample": k})
    return plan


@torch.no_grad()
def generate_batch(
    target: Any,
    rows: list[dict],
    max_new_tokens: int,
    pad_id: int,
    eos_id: int,
    temperature: float = 0.0,
) -> list[dict[str, torch.Tensor]]:
    """Target responses for one batch (greedy, or sampled at `temperature` > 0 from the global torch RNG),
    with the target's final hidden state at every position.

    Returns per prompt `tokens` (prompt + response up to and including EOS), `hidden` [len(tokens) - 1, H]
    in fp16 (position i predicts token i + 1) and `n_prompt`.
    """
    captured: list[torch.Tensor] = []
    hook = target.model.norm.register_forward_hook(lambda _m, _i, out: captured.append(out.detach()))
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
        if temperature > 0
        else {"do_sample": False}
    )
    try:
        width = max(len(r["input_ids"]) for r in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids = torch.tensor(r["input_ids"], dtype=torch.long)
            input_ids[i, width - len(ids) :] = ids
            mask[i, width - len(ids) :] = 1
        out = target.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad_id,
            eos_token_id=eos_id,
            **sampling,
        )
    finally:
        hook.remove()
    hidden = torch.cat(captured, dim=1)  # [B, width + generated − 1, H]
    results = []
    for i, r in enumerate(rows):
        n_prompt = len(r["input_ids"])
        response = out[i, width:]
        ends = (response == eos_id).nonzero()
        n_resp = int(ends[0]) + 1 if len(ends) else len(response)
        tokens = torch.cat([torch.tensor(r["input_ids"]), response[:n_resp]])
        h = hidden[i, width - n_prompt : width - 1 + n_resp]
        results.append(
            {"tokens": tokens.to(torch.int32), "hidden": h.to(torch.float16), "n_prompt": n_prompt}
        )
    return results


def generate_teacher_data(
    target: Any,
    rows: list[dict],
    max_new_tokens: int,
    batch_size: int,
    pad_id: int,
    eos_id: int,
    temperature: float = 0.0,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Teacher sequences for all `rows`, batched by similar prompt length to waste little on padding.

    Sampled batches (`temperature` > 0) seed the torch RNG from `seed` and the batch's first row key, so a
    from-scratch run is reproducible.
    """
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
    seqs: dict[int, dict] = {}
    start = time.perf_counter()
    n_generated = 0
    for b in range(0, len(order), batch_size):
        idx = order[b : b + batch_size]
        if temperature > 0:
            torch.manual_seed(seed * 1_000_003 + zlib.crc32(row_key(rows[idx[0]]).encode("utf-8")))
        batch = generate_batch(target, [rows[i] for i in idx], max_new_tokens, pad_id, eos_id, temperature)
        for i, seq in zip(idx, batch, strict=True):
            seqs[i] = {
                **seq,
                "prompt_id": rows[i]["prompt_id"],
                "task": rows[i]["task"],
                "sample": rows[i].get("sample", 0),
                "temperature": temperature,
            }
            n_generated += len(seq["tokens"]) - seq["n_prompt"]
        elapsed = time.perf_counter() - start
        log.info(
            "teacher%s: %d/%d prompts, %d response tokens, %.0f s (%.1f tok/s)",
            f" (sampled, T={temperature})" if temperature > 0 else "",
            len(seqs),
            len(rows),
            n_generated,
            elapsed,
            n_generated / elapsed,
        )
    return [seqs[i] for i in range(len(rows))]


def load_or_generate_teacher(
    path: Path,
    target: Any,
    rows: list[dict],
    config: DistillConfig,
    pad_id: int,
    eos_id: int,
) -> list[dict[str, Any]]:
    """Teacher sequences for `rows`, cached per row key at `path`; only rows not cached are generated.

    Rows with `sample` > 0 are sampled at `config.sample_temperature`, the others greedy. The cache holds
    sequences made by a target of one dtype with one `max_new_tokens`; a cached sequence counts only if it
    starts with the row's prompt ids and was made at the temperature asked for, so growing
    `sequences_per_task` costs just the new sequences.
    """
    dtype = str(next(target.parameters()).dtype).removeprefix("torch.")
    cached: dict[str, dict] = {}
    if path.is_file():
        data = torch.load(path, weights_only=True)
        # Caches written before the dtype was recorded were made by the float32 target.
        if data.get("max_new_tokens") == config.max_new_tokens and data.get("dtype", "float32") == dtype:
            cached = data["seqs"]

    def temperature(row: dict) -> float:
        return config.sample_temperature if row.get("sample", 0) > 0 else 0.0

    def fresh(row: dict) -> bool:
        seq = cached.get(row_key(row))
        return (
            seq is not None
            and seq["tokens"][: len(row["input_ids"])].tolist() == row["input_ids"]
            and seq.get("temperature", 0.0) == temperature(row)
        )

    missing = [r for r in rows if not fresh(r)]
    log.info("teacher data: %d of %d sequences cached in %s", len(rows) - len(missing), len(rows), path)
    if missing:
        for t in sorted({temperature(r) for r in missing}):
            group = [r for r in missing if temperature(r) == t]
            made = generate_teacher_data(
                target, group, config.max_new_tokens, config.gen_batch_size, pad_id, eos_id, t, config.seed
            )
            cached.update({row_key(r): s for r, s in zip(group, made, strict=True)})
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save({"max_new_tokens": config.max_new_tokens, "dtype": dtype, "seqs": cached}, tmp)
        tmp.replace(path)
    return [cached[row_key(r)] for r in rows]
