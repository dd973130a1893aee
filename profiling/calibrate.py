"""Measure the cost model on this device and compression in the decode loop itself.

Every fixed gamma, and two runs that alternate drafting with idle steps (one of them reading every signal),
run through `speculative_generate` on prompts spanning the prompt lengths; the per-step wall times it returns (draft, verify and bookkeeping, at
each step's own context length) are fitted by profiling/costfit.py. Isolated forward timings are measured
beside it for comparison.
"""

from __future__ import annotations

import platform
import statistics
import time

import numpy as np
import pandas as pd
import torch
from speckv.profiling.controllers import FixedGamma, StepContext
from speckv.profiling.costfit import ALTERNATE, ALTERNATE_READING, fit_cost_model
from speckv.profiling.costmodel import CostModel
from speckv.profiling.decode import DecodeConfig, speculative_generate
from speckv.profiling.errors import SpeckvError
from speckv.profiling.feature_draft import FeatureCache, is_feature_draft
from speckv.profiling.kv_cache import forward, truncate
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


@torch.inference_mode()
def forward_ms(model, context: list[int], n_tokens: int, repeats: int, warmup: int) -> float:
    """Median ms of one forward over `n_tokens` new tokens after a cached `context`, logits of all of them."""
    device = model.device
    cache = DynamicCache(config=model.config)
    forward(model, context, cache, device, all_logits=False)
    new = context[-n_tokens:] if n_tokens <= len(context) else (context * n_tokens)[:n_tokens]

    def once() -> None:
        forward(model, new, cache, device, all_logits=n_tokens > 1)
        truncate(cache, len(context))

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
    forward(model, context, cache, device, all_logits=False)
    samples: dict[int, list[float]] = {n: [] for n in sizes}
    for round_ in range(warmup + repeats):
        shift = round_ % len(sizes)
        for n in sizes[shift:] + sizes[:shift]:
            new = context[-n:] if n <= len(context) else (context * n)[:n]
            synchronize(device)
            t0 = time.perf_counter()
            forward(model, new, cache, device, all_logits=n > 1)
            synchronize(device)
            if round_ >= warmup:
                samples[n].append((time.perf_counter() - t0) * 1e3)
            truncate(cache, len(context))
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


class Alternating:
    """Drafts 1, 2, ..., gamma_max tokens in turn (then again from 1) with a step drafting nothing between
    every two, so that every other step switches between drafting and not: what a policy mixing both pays
    beyond the fixed-gamma steps (`costfit.switch_costs`)."""

    name = ALTERNATE
    needs_signals = False
    needs_target_signals = False

    def __init__(self, gamma_max: int, reading: bool = False) -> None:
        self.gamma_max = gamma_max
        if reading:  # the same schedule, paying for every signal a signal-driven controller reads
            self.name = ALTERNATE_READING
            self.needs_signals = self.needs_target_signals = True

    def reset(self) -> None:
        pass

    def start_step(self, ctx: StepContext) -> int:
        return 0 if ctx.step % 2 else (ctx.step // 2) % self.gamma_max + 1

    def keep_drafting(self, signals) -> bool:
        return True  # the schedule decides; the reading run only pays for the signals

    def submit(self, drafted: int) -> int:
        return drafted

    def observe(self, drafted: int, accepted: int) -> None:
        pass


def run_order(n_prompts: int, gamma_max: int) -> list[tuple[int, int | str]]:
    """(prompt index, controller) of every calibration run: each prompt at every fixed gamma 0..gamma_max and
    once each alternating run (`ALTERNATE`, `ALTERNATE_READING`), the order rotating from prompt to prompt so
    that load from elsewhere spreads over all."""
    kinds: list[int | str] = [*range(gamma_max + 1), ALTERNATE, ALTERNATE_READING]
    return [(n, k) for n in range(n_prompts) for k in kinds[n % len(kinds) :] + kinds[: n % len(kinds)]]


@torch.inference_mode()
def time_runs(
    target,
    draft,
    prompts: list[list[int]],
    runs: list[tuple[int, int | str]],
    compression: str,
    config: DecodeConfig,
) -> tuple[list[dict], list[dict]]:
    """Decode each (prompt index, fixed gamma or an alternating run's name) of `runs` in the real loop: (per
    step rows, per run rows)."""
    steps, summaries = [], []
    for n, kind in runs:
        prompt = prompts[n]
        if kind in (ALTERNATE, ALTERNATE_READING):
            controller = Alternating(config.gamma_max, reading=kind == ALTERNATE_READING)
        else:
            controller = FixedGamma(kind)
        result = speculative_generate(target, draft, prompt, controller, config, compression)
        summaries.append(
            {
                "prompt": n,
                "controller": controller.name,
                "prompt_tokens": len(prompt),
                "prefill_ms": result.prefill_s * 1e3,
                "first_gamma": result.gammas[0],
                "first_draft_ms": result.draft_s[0] * 1e3,
            }
        )
        steps += [
            {
                "prompt": n,
                "controller": controller.name,
                "step": i,
                "position": result.positions[i],
                "gamma": result.gammas[i],
                "prev_gamma": result.gammas[i - 1] if i else 0,
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
    """Every run of `run_order` on every prompt, in the real decode loop: (per step, per run) tables."""
    warm_up(target, draft, prompts[0], compression, gamma_max)
    config = loop_config(gamma_max, max_new_tokens)
    steps, runs = [], []
    for run in tqdm(run_order(len(prompts), gamma_max), desc=f"calibrate {compression}", unit="run"):
        more_steps, more_runs = time_runs(target, draft, prompts, [run], compression, config)
        steps += more_steps
        runs += more_runs
    return pd.DataFrame(steps), pd.DataFrame(runs)


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
    context = prompts[len(prompts) // 2]
    isolated_verify = verify_ms_interleaved(target, context, list(range(1, gamma_max + 2)), repeats, warmup)
    isolated_draft = draft_ms_per_token(draft, context, repeats, warmup)
    isolated_signals = signal_costs_ms(draft, target, repeats, warmup)
    # reading signals as the loop pays for it (`ALTERNATE_READING` runs), else the isolated measurement
    fitted = fit_cost_model(steps, runs, gamma_max, signals=isolated_signals)
    fit = fitted.pop("fit")
    model = CostModel(
        compression=compression,
        device=str(target.device),
        meta={
            "fit": fit,
            "prompt_tokens": [len(p) for p in prompts],
            "max_new_tokens": max_new_tokens,
            "loop_steps": len(steps),
            "isolated": {
                "context_tokens": len(context),
                "verify_ms": isolated_verify,
                "draft_ms": isolated_draft,
                "signal_ms": isolated_signals[0],
                "target_signal_ms": isolated_signals[1],
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
