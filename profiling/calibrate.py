"""Measure the cost model on this device and compression: draft ms per token, target verify ms for k tokens.

Medians over repeats after a warm-up, at a realistic context length, synchronised on CUDA. A short real
decode with the recorder on gives the per-step loop overhead that the model forwards do not explain.
"""

from __future__ import annotations

import platform
import statistics
import time

import torch
from speckv.profiling.controllers import FixedGamma
from speckv.profiling.costmodel import CostModel
from speckv.profiling.decode import DecodeConfig, _forward, _truncate, speculative_generate
from speckv.profiling.feature_draft import FeatureCache, is_feature_draft
from speckv.profiling.models import synchronize, vocab_size
from speckv.profiling.recorder import TableRecorder
from transformers import DynamicCache


def _median_ms(fn, repeats: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def monotone(values: list[float]) -> list[float]:
    """The closest non-decreasing sequence (pool adjacent violators, least squares).

    Verifying more tokens never costs less; medians that say otherwise are timing noise, and a replay or a
    stop rule fed with them would prefer a longer draft for no reason.
    """
    blocks: list[list[float]] = []  # [mean, weight]
    for v in values:
        blocks.append([v, 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m2, w2), (m1, w1) = blocks.pop(), blocks.pop()
            blocks.append([(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2])
    return [m for m, w in blocks for _ in range(int(w))]


@torch.inference_mode()
def forward_ms(model, context: list[int], n_tokens: int, repeats: int, warmup: int) -> float:
    """Median ms of one forward over `n_tokens` new tokens after a cached `context`, logits of all of them."""
    device = model.device
    cache = DynamicCache(config=model.config)
    _forward(model, context, cache, device, all_logits=False)
    new = context[-n_tokens:] if n_tokens <= len(context) else (context * n_tokens)[:n_tokens]

    def once() -> None:
        _forward(model, new, cache, device, all_logits=n_tokens > 1)
        _truncate(cache, len(context))

    return _median_ms(once, repeats, warmup, device)


@torch.inference_mode()
def verify_ms_interleaved(
    model, context: list[int], sizes: list[int], repeats: int, warmup: int
) -> list[float]:
    """Median ms of a forward over each of `sizes` new tokens after a cached `context`, all logits kept.

    The sizes take turns within every repeat (one round: each size once, the order rotating), so a burst of
    load from elsewhere inflates all of them alike instead of a contiguous run of sizes: timed one size after
    another, a few seconds of contention once made int8's 3..9-token verifies look 1.7x dearer than 2.
    """
    device = model.device
    cache = DynamicCache(config=model.config)
    _forward(model, context, cache, device, all_logits=False)
    samples: dict[int, list[float]] = {n: [] for n in sizes}
    for round_ in range(warmup + repeats):
        shift = round_ % len(sizes)
        for n in sizes[shift:] + sizes[:shift]:
            new = context[-n:] if n <= len(context) else (context * n)[:n]
            synchronize(device)
            t0 = time.perf_counter()
            _forward(model, new, cache, device, all_logits=n > 1)
            synchronize(device)
            if round_ >= warmup:
                samples[n].append((time.perf_counter() - t0) * 1e3)
            _truncate(cache, len(context))
    return [statistics.median(samples[n]) for n in sizes]


@torch.inference_mode()
def draft_ms_per_token(draft, context: list[int], repeats: int, warmup: int) -> float:
    """Median ms of one drafted token after a cached `context`, as the decode loop drafts it (a feature draft:
    one `step` reading a feature; a standalone draft: one 1-token forward)."""
    if not is_feature_draft(draft):
        return forward_ms(draft, context, 1, repeats, warmup)
    cache = FeatureCache()
    features = torch.zeros(len(context), draft.config.hidden_size, device=draft.device)
    draft.step(context, features, cache)

    def once() -> None:
        draft.step(context[-1:], features[-1:], cache)
        cache.crop(len(context))

    return _median_ms(once, repeats, warmup, draft.device)


@torch.inference_mode()
def signal_costs_ms(draft, target, repeats: int, warmup: int) -> tuple[float, float]:
    """What signal-driven controllers add to the forwards: the draft's signals of one drafted token (the
    decode loop's fused greedy pass, less the argmax every controller pays), and the target's confidence in the
    tokens a step commits (2 rows of its vocabulary: the mean commit here is 1-2 tokens)."""
    from speckv.profiling.signals import greedy_signals, target_signals

    device = target.device
    generator = torch.Generator(device="cpu").manual_seed(0)
    draft_logits = torch.randn(vocab_size(draft), generator=generator).to(device)
    target_logits = torch.randn(2, vocab_size(target), generator=generator).to(device)

    # the loop's fused pass replaces the argmax a signal-blind controller pays: charge the difference
    signal_ms = max(
        0.0,
        _median_ms(lambda: greedy_signals(draft_logits), repeats, warmup, device)
        - _median_ms(lambda: int(draft_logits.argmax()), repeats, warmup, device),
    )
    target_signal_ms = _median_ms(lambda: target_signals(target_logits), repeats, warmup, device)
    return signal_ms, target_signal_ms


@torch.inference_mode()
def calibrate(
    target,
    draft,
    compression: str,
    context: list[int],
    gamma_max: int,
    repeats: int = 15,
    warmup: int = 3,
    loop_tokens: int = 48,
) -> CostModel:
    """A CostModel measured with `context` (prompt token ids) as the cached prefix."""
    draft_ms = draft_ms_per_token(draft, context, repeats, warmup)
    raw_verify_ms = verify_ms_interleaved(target, context, list(range(1, gamma_max + 2)), repeats, warmup)
    verify_ms = monotone(raw_verify_ms)
    run = {
        "prompt_id": "calibration",
        "task": "-",
        "split": "-",
        "compression": compression,
        "controller": "fixed:4",
        "mode": "greedy",
    }
    recorder = TableRecorder(run, len(context))
    gamma = min(4, gamma_max)
    config = DecodeConfig(max_new_tokens=loop_tokens, gamma_max=gamma_max)
    result = speculative_generate(target, draft, context, FixedGamma(gamma), config, compression, recorder)
    steps = recorder.step_table().to_pandas()
    prefill_ms = (
        _median_ms(
            lambda: _forward(target, context[:-1], DynamicCache(config=target.config), target.device, False),
            3,
            1,
            target.device,
        )
        if len(context) > 1
        else 0.0
    )
    modelled = steps["draft_ms"].sum() + steps["verify_ms"].sum() + prefill_ms
    signal_ms, target_signal_ms = signal_costs_ms(draft, target, repeats, warmup)
    # the recorder makes the loop compute the target's confidence every step; that is charged separately
    # (target_signal_ms, to the controllers that read it), not to every step's overhead
    overhead_ms = max(0.0, (result.wall_s * 1e3 - modelled) / max(1, result.steps) - target_signal_ms)
    return CostModel(
        compression=compression,
        device=str(target.device),
        draft_ms=draft_ms,
        verify_ms=verify_ms,
        overhead_ms=float(overhead_ms),
        signal_ms=signal_ms,
        target_signal_ms=target_signal_ms,
        meta={
            "verify_ms_raw": raw_verify_ms,
            "context_tokens": len(context),
            "repeats": repeats,
            "warmup": warmup,
            "loop_tokens": loop_tokens,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "machine": platform.machine(),
            "processor": platform.processor(),
        },
    )


def plot_cost_models(models: list[CostModel], path) -> None:
    """Verify ms against tokens verified, one line per compression, with the draft's per-token cost."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for model in models:
        ks = list(range(1, len(model.verify_ms) + 1))
        line = ax.plot(ks, model.verify_ms, marker="o", label=f"target verify, {model.compression}")[0]
        ax.axhline(model.draft_ms, ls="--", color=line.get_color(), alpha=0.6)
    ax.set_xlabel("tokens in the verify forward (drafted + 1)")
    ax.set_ylabel("ms (median)")
    ax.set_title("Measured cost model (dashed: draft ms per token)")
    ax.legend(fontsize=8)
    ax.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
