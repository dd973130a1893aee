"""Dense greedy traces: at every position of the target's greedy continuation, the draft's own greedy
continuation of gamma_max tokens with its signals. Greedy speculative output does not depend on the gamma
policy, so these rows let any controller (and the hindsight oracle) be replayed exactly offline.
"""

from __future__ import annotations

import pyarrow as pa
import torch
from transformers import DynamicCache

from profiling.controllers import NoDraft
from profiling.decode import DecodeConfig, _forward, _truncate, speculative_generate
from profiling.schema import TRACE_SCHEMA
from profiling.signals import SIGNALS, distribution_signals


def match_length(drafted: list[int], continuation: list[int]) -> int:
    """Leading drafted tokens equal to the target's continuation from the same position."""
    n = 0
    while n < len(drafted) and n < len(continuation) and drafted[n] == continuation[n]:
        n += 1
    return n


@torch.inference_mode()
def dense_trace(
    target,
    draft,
    prompt_ids: list[int],
    gamma_max: int,
    max_new_tokens: int,
    eos_token_ids: tuple[int, ...],
    run: dict[str, str],
    continuation: list[int] | None = None,
) -> pa.Table:
    """TRACE_SCHEMA rows for one prompt. `continuation` (the target's greedy output) is computed if absent.

    `run` supplies prompt_id, task, split and compression.
    """
    if continuation is None:
        config = DecodeConfig(max_new_tokens=max_new_tokens, gamma_max=gamma_max, eos_token_ids=eos_token_ids)
        continuation = speculative_generate(target, None, prompt_ids, NoDraft(), config).token_ids
    device = draft.device
    seq = list(prompt_ids) + list(continuation)
    n_prompt, n_new = len(prompt_ids), len(continuation)
    cache = DynamicCache(config=draft.config)
    cached = 0
    cols: dict[str, list] = {f.name: [] for f in TRACE_SCHEMA}
    for i in range(n_new):
        context_end = n_prompt + i
        pending = seq[cached:context_end]
        drafted: list[int] = []
        rows: list[torch.Tensor] = []
        for _ in range(gamma_max):
            logits = _forward(draft, pending, cache, device, all_logits=False)
            cached += len(pending)
            probs = torch.softmax(logits.float(), dim=-1)
            token = int(logits.argmax())
            drafted.append(token)
            rows.append(probs)
            pending = [token]
        # the next position's context is one committed token longer: drop the drafted tail
        cached = context_end
        _truncate(cache, cached)
        signals = distribution_signals(torch.stack(rows), drafted)
        for key in ("prompt_id", "task", "split", "compression"):
            cols[key].append(run[key])
        cols["new_index"].append(i)
        cols["position"].append(context_end)
        cols["target_token"].append(continuation[i])
        cols["draft_tokens"].append(drafted)
        cols["match_len"].append(match_length(drafted, continuation[i:]))
        cols["n_new"].append(n_new)
        for k, name in enumerate(SIGNALS):
            cols[name].append([s[k] for s in signals])
    return pa.table(cols, schema=TRACE_SCHEMA)
