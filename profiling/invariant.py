"""Row-wise attention: a verify pass computes every position exactly as one-token decoding would.

Speculative decoding is lossless only if the target's logits for a position do not depend on how many
positions are computed together. In fp32 the batched verify differs from one-token decoding by float
rounding (~7e-5 in the logits of SmolLM2-135M), which can only flip an exact near-tie. bitsandbytes'
quantized targets on CPU amplify it: LLM.int8 (threshold 0) rounds every activation row to int8 before each
linear layer, so a 1e-7 difference coming out of attention moves a value across a rounding boundary and the
change grows through 30 layers. Measured on SmolLM2-135M, largest verify-vs-decode logit difference over 6
greedy tokens on 4 test prompts: int8 up to 2.86, NF4 0.14-0.34; greedy live runs diverged from the target
alone (int8 3 of 24 runs, NF4 4 of 24).

The quantized layers themselves are batch-invariant on CPU (int8: row-wise absmax quantization, exact
`torch._int_mm` int32 products, element-wise dequantization); RMSNorm, RoPE and the MLP's activation work
row by row. The operation that mixes positions differently is attention: SDPA runs a one-query kernel when
decoding and a masked multi-query kernel when verifying. With row-wise attention the same measurement gives
2e-5 for both (what remains comes from the fp32 head). `speckv_rowwise` attention gives every query row of a short
(<= MAX_ROWS) batch-1 pass its own one-query SDPA call over exactly the keys it may see (the causal prefix),
so a verify pass repeats decoding's arithmetic row by row. A masked batch (the left-padded one-token rows of
profiling/traces.py' batched continuations, the per-row verify of profiling/batch_decode.py) gets the same
call per query row over the keys its mask shows, which must be one contiguous span. Longer passes (the
prompt prefill, identical in every run) and unmasked batches take the normal SDPA path. Cost: one SDPA call per verified token per layer
(~20 us each here), paid only by targets that need it (`needs_rowwise`).
"""

from __future__ import annotations

import torch

NAME = "speckv_rowwise"
MAX_ROWS = 16  # verify passes are at most gamma_max + 1 rows; longer passes are prefills


def rowwise_attention(module, query, key, value, attention_mask, **kwargs):
    """`AttentionInterface` function: per-row one-query SDPA for short batch-1 passes, SDPA otherwise.

    Shapes as in transformers: query [B, H, Q, D], key/value [B, KV, K, D] with the cache already
    appended, so query row i is position K - Q + i and may attend to keys 0..K - Q + i.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q_len, k_len = query.shape[2], key.shape[2]
    if query.shape[0] > 1 and q_len <= MAX_ROWS and attention_mask is not None:
        return _rows_of_a_batch(module, query, key, value, attention_mask, **kwargs)
    if query.shape[0] != 1 or q_len > MAX_ROWS:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    kwargs.pop("is_causal", None)
    rows = []
    for i in range(q_len):
        visible = k_len - q_len + 1 + i
        out, _ = sdpa_attention_forward(
            module,
            query[:, :, i : i + 1],
            key[:, :, :visible],
            value[:, :, :visible],
            None,
            is_causal=False,
            **kwargs,
        )
        rows.append(out)
    return (rows[0] if q_len == 1 else torch.cat(rows, dim=1)), None


def _rows_of_a_batch(module, query, key, value, attention_mask, **kwargs):
    """A masked batch of short rows: each query row of each batch row gets the unmasked one-query SDPA call
    batch-1 decoding makes, over the contiguous span of keys its boolean mask shows ([B, 1, Q or 1, K])."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    kwargs.pop("is_causal", None)
    q_len = query.shape[2]
    visible = attention_mask[:, 0].expand(-1, q_len, -1)
    first = visible.to(torch.int8).argmax(dim=-1)
    spans = torch.stack([first, first + visible.sum(dim=-1)], dim=-1).tolist()  # one host transfer
    rows = []
    for b, row_spans in enumerate(spans):
        for i, (start, end) in enumerate(row_spans):
            out, _ = sdpa_attention_forward(
                module,
                query[b : b + 1, :, i : i + 1],
                key[b : b + 1, :, start:end],
                value[b : b + 1, :, start:end],
                None,
                is_causal=False,
                **kwargs,
            )
            rows.append(out)
    # each out is [1, 1, heads, dim] (SDPA's output transposed): query rows on dim 1, batch rows on dim 0
    return torch.cat(rows, dim=1).view(query.shape[0], q_len, *rows[0].shape[2:]), None


def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, rowwise_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)


def needs_rowwise(compression: str, device: torch.device) -> bool:
    """Targets whose logits are not batch-invariant enough for greedy losslessness without it (measured on
    CPU; on CUDA other kernels differ by batch shape too, and this was not measured)."""
    return compression in ("int8", "nf4") and device.type == "cpu"


def install(model) -> None:
    """Switch `model` to row-wise attention (batch-1 decode and verify only; see the module docstring)."""
    register()
    model.set_attn_implementation(NAME)
