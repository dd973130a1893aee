"""Teacher data for the distillation (step 1 of the recipe in `data/distill.py`): the target's responses to
the prompts, greedy or sampled, with its final hidden state at every position, cached per row in one file.

Generation is our own batched, KV-cached loop rather than `generate()`: the sampled repeats of a prompt
(tasks with few distill prompts get several) and its greedy response share one prefill, which is most of
the work for long prompts; the hidden states come from the same forwards as the logits.
"""

from __future__ import annotations

import logging
import time
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from speckv.profiling.kv_cache import stack_left_padded

if TYPE_CHECKING:
    from speckv.data.distill import DistillConfig

__all__ = [
    "generate_batch",
    "generate_teacher_data",
    "load_or_generate_teacher",
    "load_or_generate_teachers",
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


def _choose(
    logits: torch.Tensor, temperatures: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    """The next token per row: the argmax where the row's temperature is 0, else a draw from
    softmax(logits / temperature) (no top-k or top-p), in float32."""
    logits = logits.float()
    tokens = logits.argmax(-1)
    hot = temperatures > 0
    if hot.any():
        probs = torch.softmax(logits[hot] / temperatures[hot, None], dim=-1)
        tokens[hot] = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    return tokens


@torch.no_grad()
def generate_batch(
    target: Any,
    rows: list[dict],
    max_new_tokens: int,
    pad_id: int,
    eos_id: int,
    temperature: float | list[float] = 0.0,
    generator: torch.Generator | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Target responses for one batch, with the target's final hidden state at every position.

    `temperature` is one value for all rows or one per row: 0 decodes greedily, > 0 samples from
    softmax(logits / T) with `generator` (the global torch RNG when None). Rows with the same prompt ids
    share one prefill: the prompts are run once, left padded, and their KV cache is gathered to the rows
    before the rows decode, KV-cached, one token per forward. The hidden states are those forwards' own
    outputs (the model's final norm), so they are the states the logits came from.

    Returns per row `tokens` (prompt + response up to and including EOS), `hidden` [len(tokens) - 1, H]
    in fp16 (position i predicts token i + 1) and `n_prompt`.
    """
    temps = [float(temperature)] * len(rows) if isinstance(temperature, int | float) else list(temperature)
    if len(temps) != len(rows):
        raise ValueError(f"{len(temps)} temperatures for {len(rows)} rows")
    prompt_index: dict[tuple[int, ...], int] = {}
    rows_of = torch.tensor([prompt_index.setdefault(tuple(r["input_ids"]), len(prompt_index)) for r in rows])
    prompts = list(prompt_index)
    width = max(len(p) for p in prompts)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        mask[i, width - len(p) :] = 1
    prompt_hidden, cache = _prefill(target, prompts, rows_of, pad_id, max_new_tokens)
    logits = target.lm_head(prompt_hidden[:, -1])[rows_of]
    mask = mask[rows_of]
    position = mask.sum(-1, keepdim=True)  # the position of each row's next token
    temps_t = torch.tensor(temps, dtype=torch.float32)
    done = torch.zeros(len(rows), dtype=torch.bool)
    tokens: list[torch.Tensor] = []
    states: list[torch.Tensor] = []
    for step in range(max_new_tokens):
        token = torch.where(done, pad_id, _choose(logits, temps_t, generator))
        tokens.append(token)
        done |= token == eos_id
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones((len(rows), 1), dtype=torch.long)], dim=1)
        out = target.model(
            input_ids=token[:, None],
            attention_mask=mask,
            position_ids=position,
            past_key_values=cache,
            use_cache=True,
        )
        states.append(out.last_hidden_state[:, -1])
        logits = target.lm_head(states[-1])
        position = position + 1
    response = torch.stack(tokens, dim=1)
    decoded = (
        torch.stack(states, dim=1)
        if states
        else prompt_hidden.new_zeros((len(rows), 0, prompt_hidden.shape[-1]))
    )
    results = []
    for i, r in enumerate(rows):
        n_prompt = len(r["input_ids"])
        ends = (response[i] == eos_id).nonzero()
        n_resp = int(ends[0]) + 1 if len(ends) else response.shape[1]
        hidden = torch.cat([prompt_hidden[rows_of[i], width - n_prompt :], decoded[i, : n_resp - 1]])
        results.append(
            {
                "tokens": torch.cat([torch.tensor(r["input_ids"]), response[i, :n_resp]]).to(torch.int32),
                "hidden": hidden.to(torch.float16),
                "n_prompt": n_prompt,
            }
        )
    return results


PREFILL_TOKENS = 8192  # padded positions per prefill forward: prompts of similar length run together


def _prefill(
    target: Any, prompts: list[tuple[int, ...]], rows_of: torch.Tensor, pad_id: int, reserve: int
) -> tuple[torch.Tensor, Any]:
    """Every prompt's final hidden states [P, width, H] (left padded to the longest prompt) and one KV cache
    of the rows, row r holding prompt `rows_of[r]` left padded alike, with room for `reserve` more positions.

    The prompts run in forwards of similar lengths (at most PREFILL_TOKENS padded positions each), so a
    batch mixing short and long prompts does not pad every short one to the longest: the padding a single
    left-padded forward would compute (dev + test prompts, 80 of 14-384 tokens: ~half its positions) is
    never run. Masked positions never reach a real one, so the states are the single forward's.
    """
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    chunks: list[list[int]] = []
    for i in order:
        if chunks and (len(chunks[-1]) + 1) * len(prompts[i]) <= PREFILL_TOKENS:
            chunks[-1].append(i)
        else:
            chunks.append([i])
    width = len(prompts[order[-1]])
    caches, states = [], []
    for chunk in chunks:
        chunk_width = max(len(prompts[i]) for i in chunk)
        ids = torch.full((len(chunk), chunk_width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), chunk_width), dtype=torch.long)
        for row, i in enumerate(chunk):
            ids[row, chunk_width - len(prompts[i]) :] = torch.tensor(prompts[i], dtype=torch.long)
            mask[row, chunk_width - len(prompts[i]) :] = 1
        out = target.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
            use_cache=True,
        )
        caches.append(out.past_key_values)
        states.append(torch.nn.functional.pad(out.last_hidden_state, (0, 0, width - chunk_width, 0)))
    cache, _ = stack_left_padded(caches, target.config, reserve)  # rows in `order`
    slot = torch.empty(len(prompts), dtype=torch.long)
    slot[torch.tensor(order)] = torch.arange(len(prompts))  # prompt -> its row in `order`
    cache.reorder_cache(slot[rows_of])  # gathers (and repeats) each prompt's cache into its rows
    return torch.cat(states)[slot], cache


def _prompt_batches(rows: list[dict], batch_size: int) -> list[list[int]]:
    """Row indices in batches of at most `batch_size`: the rows of one prompt together (they share its
    prefill; a prompt with more rows than a batch is split), prompts in order of length (little padding)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(tuple(r["input_ids"]), []).append(i)
    batches: list[list[int]] = []
    current: list[int] = []
    for group in sorted(groups.values(), key=lambda g: len(rows[g[0]]["input_ids"])):
        for k in range(0, len(group), batch_size):
            chunk = group[k : k + batch_size]
            if len(current) + len(chunk) > batch_size:
                batches.append(current)
                current = []
            current.extend(chunk)
    if current:
        batches.append(current)
    return batches


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
    """Teacher sequences for all `rows`: greedy where a row's `sample` is 0 (or absent), sampled at
    `temperature` where it is > 0, batched by `_prompt_batches` (greedy and sampled rows of one prompt
    share its prefill).

    Each batch with sampled rows draws from its own generator, seeded from `seed` and the key of its first
    sampled row, so a from-scratch run is reproducible.
    """
    seqs: dict[int, dict] = {}
    start = time.perf_counter()
    n_generated = 0
    for idx in _prompt_batches(rows, batch_size):
        temps = [temperature if rows[i].get("sample", 0) > 0 else 0.0 for i in idx]
        generator = None
        sampled = [i for i, t in zip(idx, temps, strict=True) if t > 0]
        if sampled:
            key = row_key(rows[sampled[0]]).encode("utf-8")
            generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key))
        batch = generate_batch(
            target, [rows[i] for i in idx], max_new_tokens, pad_id, eos_id, temps, generator
        )
        for i, t, seq in zip(idx, temps, batch, strict=True):
            seqs[i] = {
                **seq,
                "prompt_id": rows[i]["prompt_id"],
                "task": rows[i]["task"],
                "sample": rows[i].get("sample", 0),
                "temperature": t,
            }
            n_generated += len(seq["tokens"]) - seq["n_prompt"]
        elapsed = time.perf_counter() - start
        log.info(
            "teacher: %d/%d sequences (%d sampled), %d response tokens, %.0f s (%.1f tok/s)",
            len(seqs),
            len(rows),
            sum(1 for s in seqs.values() if s["temperature"] > 0),
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
    return load_or_generate_teachers([(path, rows)], target, config, pad_id, eos_id)[0]


def load_or_generate_teachers(
    jobs: list[tuple[Path, list[dict]]],
    target: Any,
    config: DistillConfig,
    pad_id: int,
    eos_id: int,
) -> list[list[dict[str, Any]]]:
    """`load_or_generate_teacher` for several cache files at once: the rows missing from all of them are
    generated in one run (shared batches: dev and test together fill a batch where each alone would not),
    then each file is written; returns each job's sequences in its rows' order."""
    dtype = str(next(target.parameters()).dtype).removeprefix("torch.")

    def temperature(row: dict) -> float:
        return config.sample_temperature if row.get("sample", 0) > 0 else 0.0

    caches: list[dict[str, dict]] = []
    missing: list[tuple[int, dict]] = []
    for job, (path, rows) in enumerate(jobs):
        cached: dict[str, dict] = {}
        if path.is_file():
            data = torch.load(path, weights_only=True)
            # Caches written before the dtype was recorded were made by the float32 target.
            if data.get("max_new_tokens") == config.max_new_tokens and data.get("dtype", "float32") == dtype:
                cached = data["seqs"]
        caches.append(cached)
        stale = []
        for row in rows:
            seq = cached.get(row_key(row))
            fresh = (
                seq is not None
                and seq["tokens"][: len(row["input_ids"])].tolist() == row["input_ids"]
                and seq.get("temperature", 0.0) == temperature(row)
            )
            if not fresh:
                stale.append((job, row))
        log.info("teacher data: %d of %d sequences cached in %s", len(rows) - len(stale), len(rows), path)
        missing.extend(stale)
    if missing:
        made = generate_teacher_data(
            target,
            [row for _, row in missing],
            config.max_new_tokens,
            config.gen_batch_size,
            pad_id,
            eos_id,
            config.sample_temperature,
            config.seed,
        )
        for (job, row), seq in zip(missing, made, strict=True):
            caches[job][row_key(row)] = seq
        for job in sorted({job for job, _ in missing}):
            path = jobs[job][0]
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            torch.save({"max_new_tokens": config.max_new_tokens, "dtype": dtype, "seqs": caches[job]}, tmp)
            tmp.replace(path)
    return [[caches[job][row_key(r)] for r in rows] for job, (_, rows) in enumerate(jobs)]
