"""The incremental references for dense traces: what the batched, teacher-forced passes of traces.py and
feature_traces.py must equal. The draft drafts gamma_max tokens at every position of the target's greedy
continuation one forward at a time, as the decode loop would, its cache rolled back after each position.
Tests hold the batched traces equal to these on tiny pairs; benchmarks/bench_traces.py times both on a real
pair and counts where float rounding makes them differ.
"""

from __future__ import annotations

import pyarrow as pa
import torch
from speckv.profiling.feature_draft import FeatureCache, FeatureDraft, is_feature_draft, shifted_features
from speckv.profiling.feature_traces import target_features
from speckv.profiling.kv_cache import forward, truncate
from speckv.profiling.signals import distribution_signals
from speckv.profiling.trace_types import DraftPath, match_length
from speckv.profiling.traces import continuation_incremental, trace_table
from transformers import DynamicCache


@torch.inference_mode()
def draft_path_incremental(
    draft, prompt_ids: list[int], continuation: list[int], gamma_max: int
) -> DraftPath:
    """The reference: gamma_max sequential draft forwards at every position, the cache rolled back after."""
    device = draft.device
    seq = list(prompt_ids) + list(continuation)
    n_prompt = len(prompt_ids)
    cache = DynamicCache(config=draft.config)
    cached = 0
    tokens, match, signals = [], [], []
    for i in range(len(continuation)):
        context_end = n_prompt + i
        pending = seq[cached:context_end]
        drafted: list[int] = []
        rows: list[torch.Tensor] = []
        for _ in range(gamma_max):
            logits = forward(draft, pending, cache, device, all_logits=False)
            cached += len(pending)
            rows.append(torch.softmax(logits.float(), dim=-1))
            drafted.append(int(logits.argmax()))
            pending = [drafted[-1]]
        # the next position's context is one committed token longer: drop the drafted tail
        cached = context_end
        truncate(cache, cached)
        tokens.append(drafted)
        match.append(match_length(drafted, continuation[i:]))
        signals.append(distribution_signals(torch.stack(rows), drafted))
    return DraftPath(tokens, match, signals)


@torch.inference_mode()
def feature_draft_path_incremental(
    draft: FeatureDraft,
    features: torch.Tensor,
    prompt_ids: list[int],
    continuation: list[int],
    gamma_max: int,
) -> DraftPath:
    """The reference: the decode loop's `step` calls at every position, the drafted positions rolled back."""
    seq = list(prompt_ids) + list(continuation)
    inputs = shifted_features(features).to(draft.dtype)
    n_prompt = len(prompt_ids)
    cache = FeatureCache()
    tokens, match, signals = [], [], []
    for i in range(len(continuation)):
        start = n_prompt + i
        cached = cache.get_seq_length()
        pending, pending_features = seq[cached:start], inputs[cached:start]
        drafted, rows = [], []
        for _ in range(gamma_max):
            logits, own = draft.step(pending, pending_features, cache)
            rows.append(torch.softmax(logits, dim=-1))
            drafted.append(int(logits.argmax()))
            pending, pending_features = [drafted[-1]], own[None]
        cache.crop(start)
        tokens.append(drafted)
        match.append(match_length(drafted, continuation[i:]))
        signals.append(distribution_signals(torch.stack(rows), drafted))
    return DraftPath(tokens, match, signals)


def dense_trace(
    target,
    draft,
    prompt_ids: list[int],
    gamma_max: int,
    max_new_tokens: int,
    eos_token_ids: tuple[int, ...],
    run: dict[str, str],
) -> pa.Table:
    """The incremental reference trace of one prompt (TRACE_SCHEMA rows)."""
    continuation = continuation_incremental(target, prompt_ids, max_new_tokens, eos_token_ids)
    if is_feature_draft(draft):
        features = target_features(target, prompt_ids, continuation.tokens)
        path = feature_draft_path_incremental(draft, features, prompt_ids, continuation.tokens, gamma_max)
    else:
        path = draft_path_incremental(draft, prompt_ids, continuation.tokens, gamma_max)
    return trace_table(run, continuation, path, len(prompt_ids))
