"""Dense greedy traces: at every position of the target's greedy continuation, the draft's own greedy
continuation of gamma_max tokens with its signals, and the target's confidence in the token just committed.
Greedy speculative output does not depend on the gamma policy, so these rows let any controller (and the
hindsight oracle) be replayed exactly offline.

Computed teacher-forced and batched (`batched_traces`), because in greedy decoding a drafted token can only
be accepted while it sits on the target's own continuation:
  1. the target's continuations of many prompts are decoded together, one token per prompt per forward
     (each prompt prefilled alone, exactly as the decode loop does; left-padded caches; int8/nf4 targets keep
     their row-wise attention, so each row repeats batch-1 decoding's arithmetic);
  2. ONE draft forward over prompt + continuation gives the draft's tokens and signals all along that path;
  3. only the off-path tail after each position's first mismatch still needs drafting, and those tails are
     independent, so they are drafted as one batch over the shared teacher-forced cache.
The incremental reference is in profiling/trace_reference.py.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pyarrow as pa
import torch
from speckv.profiling.controllers import NoDraft
from speckv.profiling.decode import DecodeConfig, speculative_generate
from speckv.profiling.feature_draft import forward_with_features, is_feature_draft
from speckv.profiling.feature_traces import feature_draft_path, target_features
from speckv.profiling.kv_cache import growing_cache, stack_left_padded
from speckv.profiling.schema import TRACE_SCHEMA
from speckv.profiling.signals import SIGNALS, distribution_signals, target_signals
from speckv.profiling.trace_types import DraftPath
from transformers import DynamicCache


@dataclass
class Continuation:
    """The target's greedy continuation of one prompt and, per new_index i, its confidence in the token the
    step starting there sees last (the last prompt token for i = 0, else the i-th generated token)."""

    tokens: list[int]
    target_top1: list[float]
    target_entropy: list[float]
    # the target's final hidden state at positions 0 .. L-2 of prompt + continuation (L tokens), float32:
    # what a feature draft reads; kept by `target_continuations(..., features=True)` from its own forwards
    features: torch.Tensor | None = None


@torch.inference_mode()
def target_continuations(
    target,
    prompts: list[list[int]],
    max_new_tokens: int,
    eos_token_ids: tuple[int, ...],
    batch_size: int = 16,
    features: bool = False,
) -> list[Continuation]:
    """The target's greedy continuations of `prompts`, decoded `batch_size` at a time.

    Each prompt is prefilled alone over all but its last token, as `speculative_generate` does; decoding
    then feeds one token per prompt per forward. EOS ends a prompt's continuation (the EOS token included).
    The forwards stop at the final hidden states and the head is applied to them here, as the decode loop's
    `forward_with_features` does; with `features` each continuation keeps those states, so a feature draft's
    trace needs no second target pass over the sequence.
    """
    out: list[Continuation] = []
    device = target.device
    for start in range(0, len(prompts), batch_size):
        group = prompts[start : start + batch_size]
        caches, first, prefilled = [], [], []
        for ids in group:
            cache = DynamicCache(config=target.config)
            if len(ids) > 1:
                logits, hidden = forward_with_features(target, ids[:-1], cache, device, all_logits=False)
                if features:
                    prefilled.append(hidden.float())
                first.append(target_signals(logits[None])[0])
            else:
                first.append((float("nan"), float("nan")))
            caches.append(cache)
        if any(c.get_seq_length() == 0 for c in caches):
            # a one-token prompt has nothing to prefill to stack: decode this group one prompt at a time
            out += [continuation_incremental(target, ids, max_new_tokens, eos_token_ids) for ids in group]
            continue
        cache, pads = stack_left_padded(caches, target.config, max_new_tokens)
        del caches
        b = len(group)
        lengths = torch.tensor([len(ids) - 1 for ids in group], device=device)  # tokens held per row
        last = torch.tensor([[ids[-1]] for ids in group], device=device)
        pad_mask = torch.arange(cache.get_seq_length(), device=device)[None, :] >= torch.tensor(pads)[:, None]
        tokens: list[list[int]] = [[] for _ in group]
        top1 = [[f[0]] for f in first]
        entropy = [[f[1]] for f in first]
        done = [False] * b
        eos = frozenset(eos_token_ids)
        decoded: list[torch.Tensor] = []  # per step, [b, H]: the state of the token fed at that step
        for _ in range(max_new_tokens):
            pad_mask = torch.cat([pad_mask, torch.ones(b, 1, dtype=torch.bool, device=device)], dim=1)
            hidden = target.model(
                input_ids=last,
                attention_mask=pad_mask[:, None, None, :],
                position_ids=lengths[:, None],
                past_key_values=cache,
                use_cache=True,
            ).last_hidden_state[:, -1]
            if features:
                decoded.append(hidden.float())
            logits = target.get_output_embeddings()(hidden)
            chosen = logits.argmax(dim=-1)
            stats = target_signals(logits)
            for row in range(b):
                if done[row]:
                    continue
                tok = int(chosen[row])
                tokens[row].append(tok)
                top1[row].append(stats[row][0])
                entropy[row].append(stats[row][1])
                done[row] = tok in eos or len(tokens[row]) >= max_new_tokens
            if all(done):
                break
            last = chosen[:, None]
            lengths = lengths + 1
        # position i's confidence is that of the token before it: drop the one after the last token
        for row, (t, p, h) in enumerate(zip(tokens, top1, entropy, strict=True)):
            kept = None
            if features:  # prompt positions 0 .. n-2 from the prefill, then one per token fed: n-1 .. L-2
                kept = torch.cat([prefilled[row], torch.stack([d[row] for d in decoded[: len(t)]])])
            out.append(Continuation(t, p[: len(t)], h[: len(t)], kept))
    return out


@torch.inference_mode()
def draft_path(
    draft, prompt_ids: list[int], continuation: list[int], gamma_max: int, signals_of=distribution_signals
) -> DraftPath:
    """The draft's greedy gamma_max tokens at every position of `continuation`, teacher-forced and batched.

    Token j drafted at position i sits on the target's path while tokens 0..j-1 matched it, so its logits
    are the teacher-forced ones at context prompt + continuation[:i + j]; after the first mismatch the tail
    is drafted, all positions' tails together, over the teacher-forced cache with a per-row mask.
    `signals_of(probs, tokens)` gives each drafted token's signals (default: SIGNALS).
    """
    device = draft.device
    n_prompt, n_new = len(prompt_ids), len(continuation)
    seq = list(prompt_ids) + list(continuation)
    cache = growing_cache(draft.config, gamma_max)  # the tails append in place after the repeat
    out = draft(
        input_ids=torch.tensor([seq], device=device),
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=n_new + 1,
    )
    probs = torch.softmax(out.logits[0].float(), dim=-1)  # row t: context prompt + continuation[:t]
    path_tokens = probs.argmax(dim=-1).tolist()
    path_signals = signals_of(probs, path_tokens)

    tokens = [[0] * gamma_max for _ in range(n_new)]
    signals: list[list[tuple]] = [[()] * gamma_max for _ in range(n_new)]
    match = [0] * n_new
    tails = []  # (position i, first tail index, prefix length, the token that left the path)
    for i in range(n_new):
        j = 0
        while j < gamma_max:
            tokens[i][j], signals[i][j] = path_tokens[i + j], path_signals[i + j]
            if i + j >= n_new or path_tokens[i + j] != continuation[i + j]:
                break
            j += 1
        match[i] = j
        if j + 1 < gamma_max:
            tails.append((i, j + 1, n_prompt + i + j, path_tokens[i + j]))
    if tails:
        _draft_tails(draft, cache, tails, gamma_max, tokens, signals, signals_of)
    return DraftPath(tokens, match, signals)


def _draft_tails(
    draft, cache: DynamicCache, tails: list[tuple], gamma_max: int, tokens, signals, signals_of
) -> None:
    """Greedy-draft every off-path tail as one batch; fills `tokens` and `signals` in place."""
    device = draft.device
    b = len(tails)
    cache.batch_repeat_interleave(b)
    shared = cache.get_seq_length()
    prefix = torch.tensor([t[2] for t in tails], device=device)
    mask = torch.arange(shared, device=device)[None, :] < prefix[:, None]  # each row sees its own prefix
    last = torch.tensor([[t[3]] for t in tails], device=device)
    for step in range(gamma_max - min(t[1] for t in tails)):
        mask = torch.cat([mask, torch.ones(b, 1, dtype=torch.bool, device=device)], dim=1)
        logits = draft(
            input_ids=last,
            attention_mask=mask[:, None, None, :],
            position_ids=(prefix + step)[:, None],
            past_key_values=cache,
            use_cache=True,
        ).logits[:, -1]
        probs = torch.softmax(logits.float(), dim=-1)
        chosen = probs.argmax(dim=-1)
        values = signals_of(probs, chosen.tolist())
        for row, (i, first, _, _) in enumerate(tails):
            j = first + step
            if j < gamma_max:
                tokens[i][j], signals[i][j] = int(chosen[row]), values[row]
        last = chosen[:, None]


def trace_table(run: dict[str, str], continuation: Continuation, path: DraftPath, n_prompt: int) -> pa.Table:
    """TRACE_SCHEMA rows of one prompt; `run` supplies prompt_id, task, split and compression."""
    n_new = len(continuation.tokens)
    cols: dict[str, list] = {f.name: [] for f in TRACE_SCHEMA}
    for key in ("prompt_id", "task", "split", "compression"):
        cols[key] = [run[key]] * n_new
    cols["new_index"] = list(range(n_new))
    cols["position"] = [n_prompt + i for i in range(n_new)]
    cols["target_token"] = list(continuation.tokens)
    cols["draft_tokens"] = path.draft_tokens
    cols["match_len"] = path.match_len
    cols["n_new"] = [n_new] * n_new
    cols["target_top1"] = continuation.target_top1
    cols["target_entropy"] = continuation.target_entropy
    for k, name in enumerate(SIGNALS):
        cols[name] = [[s[k] for s in row] for row in path.signals]
    return pa.table(cols, schema=TRACE_SCHEMA)


class _Confidences(NoDraft):
    """The target alone, noting the target's confidence the loop hands every step."""

    needs_target_signals = True

    def __init__(self) -> None:
        self.seen: list[tuple[float, float]] = []

    def start_step(self, ctx) -> int:
        self.seen.append((ctx.target_top1, ctx.target_entropy))
        return 0


def continuation_incremental(
    target, prompt_ids: list[int], max_new_tokens: int, eos_token_ids: tuple[int, ...]
) -> Continuation:
    """The continuation by the decode loop itself with the target alone, plus its confidences: what the
    batched continuations must equal, and what a group holding a one-token prompt runs instead."""
    config = DecodeConfig(max_new_tokens=max_new_tokens, gamma_max=1, eos_token_ids=eos_token_ids)
    noted = _Confidences()
    tokens = speculative_generate(target, None, prompt_ids, noted, config).token_ids
    return Continuation(tokens, [c[0] for c in noted.seen], [c[1] for c in noted.seen])


def batched_traces(
    target,
    draft,
    prompts: list[list[int]],
    gamma_max: int,
    max_new_tokens: int,
    eos_token_ids: tuple[int, ...],
    runs: list[dict[str, str]],
    batch_size: int = 16,
) -> list[pa.Table]:
    """Trace tables of many prompts: batched target continuations, teacher-forced draft paths."""
    reads_features = is_feature_draft(draft)
    continuations = target_continuations(
        target, prompts, max_new_tokens, eos_token_ids, batch_size, features=reads_features
    )
    tracer = tracing_copy(draft)
    tables = []
    for ids, c, run in zip(prompts, continuations, runs, strict=True):
        if reads_features:
            features = c.features
            if features is None:  # a group decoded one prompt at a time kept none
                features = target_features(target, ids, c.tokens)
            path = feature_draft_path(tracer, features, ids, c.tokens, gamma_max)
        else:
            path = draft_path(tracer, ids, c.tokens, gamma_max)
        tables.append(trace_table(run, c, path, len(ids)))
    return tables


def tracing_copy(draft):
    """The draft as the batched passes should run it: a float32 copy of a half-precision draft on CPU.

    torch's CPU half-precision GEMM is fast for one row (the decode loop) but ~10x slower than float32 for the
    tens to hundreds of rows a teacher-forced pass or a batch of tails multiplies; float32 holds every half
    weight exactly, and bench_traces.py reports how often the rounding difference flips a drafted token.
    """
    if draft.device.type != "cpu" or draft.dtype not in (torch.float16, torch.bfloat16):
        return draft
    return copy.deepcopy(draft).float()
