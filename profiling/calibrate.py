"""Measure the cost model on this device and compression in the decode loop itself.

Every fixed gamma runs through `speculative_generate` on prompts spanning the prompt lengths; the per-step
wall times it returns (draft, verify and bookkeeping, at each step's own context length) are fitted as a
level per gamma plus one slope in the context length, and the prefills as lines in the prompt length. Isolated forward
timings are measured beside it for comparison.
"""

from __future__ import annotations

import platform
import statistics
import time

import numpy as np
import pandas as pd
import torch
from speckv.profiling.controllers import FixedGamma
from speckv.profiling.costmodel import CostModel
from speckv.profiling.decode import DecodeConfig, _forward, _truncate, speculative_generate
from speckv.profiling.errors import SpeckvError
from speckv.profiling.feature_draft import FeatureCache, is_feature_draft
from speckv.profiling.models import synchronize, vocab_size
from tqdm import tqdm
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
    another, a few seconds of contention can make int8's 3..9-token verifies look 1.7x dearer than 2.
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


def robust_line(x, y) -> tuple[float, float]:
    """(intercept, slope) of a least-squares line through (x, y), refitted once without the points more than
    four median absolute deviations off the first fit (a descheduled step is an outlier, not a cost).
    A single x gives slope 0 at the median."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) == 0:
        raise SpeckvError("no timings to fit")
    if np.ptp(x) == 0:
        return float(np.median(y)), 0.0
    slope, intercept = np.polyfit(x, y, 1)
    residual = y - (intercept + slope * x)
    mad = float(np.median(np.abs(residual - np.median(residual))))
    keep = np.abs(residual) <= 4 * max(mad, 1e-9)
    if keep.sum() >= 2 and np.ptp(x[keep]) > 0:
        slope, intercept = np.polyfit(x[keep], y[keep], 1)
    return float(intercept), float(slope)


def run_order(n_prompts: int, gamma_max: int) -> list[tuple[int, int]]:
    """(prompt index, gamma) of every calibration run: each prompt at every fixed gamma 0..gamma_max, the gamma
    order rotating from prompt to prompt so that load from elsewhere spreads over all of them."""
    gammas = list(range(gamma_max + 1))
    return [(n, g) for n in range(n_prompts) for g in gammas[n % len(gammas) :] + gammas[: n % len(gammas)]]


@torch.inference_mode()
def time_runs(
    target,
    draft,
    prompts: list[list[int]],
    runs: list[tuple[int, int]],
    compression: str,
    config: DecodeConfig,
) -> tuple[list[dict], list[dict]]:
    """Decode each (prompt index, fixed gamma) of `runs` in the real loop: (per step rows, per run rows)."""
    steps, summaries = [], []
    for n, gamma in runs:
        prompt = prompts[n]
        result = speculative_generate(target, draft, prompt, FixedGamma(gamma), config, compression)
        summaries.append(
            {
                "prompt": n,
                "controller": gamma,
                "prompt_tokens": len(prompt),
                "prefill_ms": result.prefill_s * 1e3,
                "first_gamma": result.gammas[0],
                "first_draft_ms": result.draft_s[0] * 1e3,
            }
        )
        steps += [
            {
                "prompt": n,
                "controller": gamma,
                "step": i,
                "position": result.positions[i],
                "gamma": result.gammas[i],
                "step_ms": result.step_s[i] * 1e3,
                "draft_ms": result.draft_s[i] * 1e3,
                "verify_ms": result.verify_s[i] * 1e3,
            }
            for i in range(result.steps)
        ]
    return steps, summaries


def loop_config(gamma_max: int, max_new_tokens: int) -> DecodeConfig:
    """Calibration runs: no EOS, so each covers max_new_tokens of context growth."""
    return DecodeConfig(max_new_tokens=max_new_tokens, gamma_max=gamma_max)


def warm_up(target, draft, prompt: list[int], compression: str, gamma_max: int) -> None:
    """One short untimed run at gamma 0 and at gamma_max (allocations, kernel selection)."""
    warm = loop_config(gamma_max, 8)
    for gamma in (0, gamma_max):
        speculative_generate(target, draft, prompt, FixedGamma(gamma), warm, compression)


@torch.inference_mode()
def loop_timings(
    target, draft, prompts: list[list[int]], compression: str, gamma_max: int, max_new_tokens: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every fixed gamma 0..gamma_max on every prompt, in the real decode loop: (per step, per run) tables."""
    warm_up(target, draft, prompts[0], compression, gamma_max)
    config = loop_config(gamma_max, max_new_tokens)
    steps, runs = [], []
    for run in tqdm(run_order(len(prompts), gamma_max), desc=f"calibrate {compression}", unit="run"):
        more_steps, more_runs = time_runs(target, draft, prompts, [run], compression, config)
        steps += more_steps
        runs += more_runs
    return pd.DataFrame(steps), pd.DataFrame(runs)


def pooled_slope(steps: pd.DataFrame) -> float:
    """ms per context token shared by every gamma: the least-squares slope of the steps' time on their
    context length within each gamma, refitted once without the steps more than four median absolute
    deviations off the first fit; never negative.

    One slope for all gammas, not one per gamma: a few calibration prompts give each gamma a handful of
    contexts, and per-gamma slopes swung with the load during each run (leave-one-prompt-out error of the
    mean step on the calibration's own prompts: int8 8.4% -> 6.2%, nf4 17.9% -> 10.5%, fp32 13.6% -> 14.0%).
    """
    kept = steps
    slope = 0.0
    for _ in range(2):
        by_gamma = kept.groupby("gamma")
        x = kept["position"] - by_gamma["position"].transform("mean")
        y = kept["step_ms"] - by_gamma["step_ms"].transform("mean")
        denominator = float((x**2).sum())
        slope = float((x * y).sum()) / denominator if denominator > 0 else 0.0
        residual = y - slope * x
        mad = float(np.median(np.abs(residual - np.median(residual))))
        kept = kept[(np.abs(residual) <= 4 * max(mad, 1e-9)).to_numpy()]
    return max(slope, 0.0)


def stalled(ms: np.ndarray) -> np.ndarray:
    """Steps the process spent descheduled: more than eight median absolute deviations above the median.

    On a shared machine a step now and then takes 10-50x its time (another job took the core); one such
    step moves a gamma's mean by more than the differences between gammas. Slower stretches of load stay in:
    they are what a run pays."""
    median = float(np.median(ms))
    mad = float(np.median(np.abs(ms - median)))
    return ms > median + 8 * max(mad, 1e-3 * median)


def fit_cost_model(steps: pd.DataFrame, runs: pd.DataFrame, gamma_max: int) -> dict:
    """The loop's cost model from its own timed steps: every decode step (step 0 belongs to the time to
    first token) is a gamma's level plus a context slope shared by all gammas (`pooled_slope`); a level is
    the mean step as a run pays it (`stalled` steps left out), made non-decreasing in gamma. The draft's
    per-token cost is a line in the context; the target's and the draft's prefill are lines in the prompt
    length."""
    decode = steps[steps["step"] > 0]
    lo, hi = float(decode["position"].min()), float(decode["position"].max())
    reference = float(decode["position"].mean())
    counts = decode["gamma"].value_counts()
    short = [g for g in range(gamma_max + 1) if counts.get(g, 0) < 3]
    if short:
        raise SpeckvError(
            f"calibration has fewer than 3 decode steps drafting {short} (a run drafts at most max_new_tokens "
            "- new tokens - 1 per step, and a well-matched pair reaches the end in few steps): raise "
            "calibrate.max_new_tokens or calibrate.loop_prompts"
        )
    slope = pooled_slope(decode)
    levels, fit = [], {}
    for gamma in range(gamma_max + 1):
        rows = decode[decode["gamma"] == gamma]
        at_reference = (rows["step_ms"] - slope * (rows["position"] - reference)).to_numpy()
        kept = at_reference[~stalled(at_reference)]
        levels.append(float(np.mean(kept)))
        predicted = levels[-1] + slope * (rows["position"] - reference)
        fit[gamma] = {
            "steps": len(rows),
            "stalled": int(len(rows) - len(kept)),
            "median_abs_error": float(np.median(np.abs(rows["step_ms"] - predicted) / predicted)),
        }
    step_ms = monotone(levels)

    drafting = decode[decode["gamma"] > 0]
    drafting = drafting[~stalled((drafting["draft_ms"] / drafting["gamma"]).to_numpy())]
    per_token = drafting["draft_ms"] / drafting["gamma"]
    _, draft_slope = robust_line(drafting["position"], per_token)
    draft_slope = max(draft_slope, 0.0)
    draft_ms = float(np.mean(per_token - draft_slope * (drafting["position"] - reference)))

    prefill = robust_line(runs["prompt_tokens"] - 1, runs["prefill_ms"])
    first = runs[runs["first_gamma"] > 0]
    # the draft's first forward reads the whole prompt; the rest of step 0's drafts are ordinary tokens
    own = first["first_draft_ms"] - (first["first_gamma"] - 1) * (
        draft_ms + draft_slope * (first["prompt_tokens"] - reference)
    )
    draft_prefill = robust_line(first["prompt_tokens"], own) if len(first) else (0.0, 0.0)
    return {
        "context_tokens": reference,
        "step_ms": step_ms,
        "step_ms_per_token": [slope] * (gamma_max + 1),
        "draft_ms": draft_ms,
        "draft_ms_per_token": draft_slope,
        "prefill_ms": [max(prefill[0], 0.0), max(prefill[1], 0.0)],
        "draft_prefill_ms": [max(draft_prefill[0], 0.0), max(draft_prefill[1], 0.0)],
        "fit": {"contexts": [lo, hi], "by_gamma": fit},
    }


def calibration_prompts(prompts: list[list[int]], count: int) -> list[list[int]]:
    """`count` prompts spread evenly over the range of prompt lengths (shortest and longest included)."""
    if not prompts or count < 1:
        raise SpeckvError("calibration needs at least one prompt")
    ordered = sorted(prompts, key=len)
    picks = np.unique(np.round(np.linspace(0, len(ordered) - 1, min(count, len(ordered)))).astype(int))
    return [ordered[i] for i in picks]


@torch.inference_mode()
def calibrate(
    target,
    draft,
    compression: str,
    prompts: list[list[int]],
    gamma_max: int,
    max_new_tokens: int = 64,
    repeats: int = 15,
    warmup: int = 3,
) -> tuple[CostModel, pd.DataFrame]:
    """A CostModel fitted to the decode loop's own steps on `prompts`, and those steps.

    Isolated timings (a forward repeated on a warm cache after the median prompt) are kept in `meta` beside
    it: they leave out what the loop pays between forwards, which is why the model is fitted in the loop.
    """
    steps, runs = loop_timings(target, draft, prompts, compression, gamma_max, max_new_tokens)
    fitted = fit_cost_model(steps, runs, gamma_max)
    context = prompts[len(prompts) // 2]
    isolated_verify = verify_ms_interleaved(target, context, list(range(1, gamma_max + 2)), repeats, warmup)
    isolated_draft = draft_ms_per_token(draft, context, repeats, warmup)
    signal_ms, target_signal_ms = signal_costs_ms(draft, target, repeats, warmup)
    fit = fitted.pop("fit")
    model = CostModel(
        compression=compression,
        device=str(target.device),
        signal_ms=signal_ms,
        target_signal_ms=target_signal_ms,
        meta={
            "fit": fit,
            "prompt_tokens": [len(p) for p in prompts],
            "max_new_tokens": max_new_tokens,
            "loop_steps": len(steps),
            "isolated": {
                "context_tokens": len(context),
                "verify_ms": isolated_verify,
                "draft_ms": isolated_draft,
            },
            "repeats": repeats,
            "warmup": warmup,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "machine": platform.machine(),
            "processor": platform.processor(),
        },
        **fitted,
    )
    return model, steps.assign(compression=compression)
