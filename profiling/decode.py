"""The one speculative decoding loop: profiling, deployment and evaluation all run `speculative_generate`.

Speculative decoding (Leviathan et al. 2023, arXiv 2211.17192; Chen et al. 2023, arXiv 2302.01318):
  1. the draft proposes tokens one at a time, a controller deciding after each one whether to go on;
  2. the target scores the last committed token and every drafted token in one forward pass;
  3. greedy: accept the longest drafted prefix equal to the target's argmax; sampling: accept token i with
     probability min(1, p_i/q_i), on the first rejection resample from norm(max(0, p - q));
  4. append the target's own next token (the correction, or the bonus token when all were accepted),
     and roll both KV caches back to the committed sequence.
The output distribution is exactly the target's, so greedy output equals target-only greedy output.

Each step is a function below; `Draft` hides what kind of draft proposes the tokens (a causal LM with its own
KV cache, a feature draft reading the target's hidden states, or none).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from speckv.profiling.acceptance import logits_to_probs, sample, verify_greedy, verify_sampling
from speckv.profiling.controllers import Controller, StepContext, draft_budget, submitted
from speckv.profiling.errors import SpeckvError
from speckv.profiling.feature_draft import (
    FeatureCache,
    TargetFeatures,
    forward_with_features,
    is_feature_draft,
)
from speckv.profiling.generation import DecodeConfig, GenerationResult, Recorder, StepOutcome
from speckv.profiling.kv_cache import forward, truncate
from speckv.profiling.models import synchronize
from speckv.profiling.signals import TargetConfidence, TokenSignals, distribution_signals, greedy_signals
from transformers import DynamicCache

__all__ = [
    "DecodeConfig",
    "GenerationResult",
    "Recorder",
    "StepOutcome",
    "logits_to_probs",
    "speculative_generate",
    "verify_sampling",
]


class Draft:
    """No draft: the target's prefill and verify forwards, and nothing to draft or roll back.

    The subclasses add a draft model. Its cache is filled lazily, from the first token it drafts, so a
    controller that never drafts never pays for the draft's prefill.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def prefill(self, target, ids: list[int], cache: DynamicCache) -> torch.Tensor:
        """The target's forward over the prompt but its last token: logits of the last position."""
        return forward(target, ids, cache, self.device, all_logits=False)

    def verify(self, target, ids: list[int], cache: DynamicCache) -> torch.Tensor:
        """The target's forward over the last committed token and the drafted ones: logits of every position."""
        return forward(target, ids, cache, self.device, all_logits=True)

    def start(self, tokens: list[int]) -> None:
        """Get ready to draft after the committed `tokens`."""

    def propose(self) -> torch.Tensor:
        """Logits of the next drafted token; `feed` then hands the draft the token chosen from them."""
        raise NotImplementedError

    def feed(self, token: int) -> None:
        self.pending = [token]

    def rollback(self, committed: int, accepted: int, drafted: int) -> None:
        """Keep only what the committed sequence holds: `committed` tokens before the step, then `accepted`
        of the `drafted` tokens and the target's own next token."""


class CausalDraft(Draft):
    """A causal LM drafting on its own KV cache."""

    def __init__(self, model, device: torch.device) -> None:
        super().__init__(device)
        self.model = model
        self.cache = DynamicCache(config=model.config)
        self.cached = 0  # positions the draft cache holds

    def start(self, tokens: list[int]) -> None:
        self.pending = tokens[self.cached :]

    def propose(self) -> torch.Tensor:
        logits = forward(self.model, self.pending, self.cache, self.device, all_logits=False)
        self.cached += len(self.pending)
        return logits

    def rollback(self, committed: int, accepted: int, drafted: int) -> None:
        if drafted:
            self.cached = min(self.cached, committed + accepted)
            truncate(self.cache, self.cached)


class FeatureConditionedDraft(Draft):
    """A feature draft: every target forward also returns the target's final hidden states, which it reads."""

    def __init__(self, model, hidden_size: int, device: torch.device) -> None:
        super().__init__(device)
        self.model = model
        self.cache = FeatureCache()
        self.features = TargetFeatures(hidden_size, device)
        self.cached = 0
        self.verified: torch.Tensor | None = None  # the last verify's hidden states

    def prefill(self, target, ids: list[int], cache: DynamicCache) -> torch.Tensor:
        logits, hidden = forward_with_features(target, ids, cache, self.device, all_logits=False)
        self.features.extend(hidden)
        return logits

    def verify(self, target, ids: list[int], cache: DynamicCache) -> torch.Tensor:
        logits, self.verified = forward_with_features(target, ids, cache, self.device, all_logits=True)
        return logits

    def start(self, tokens: list[int]) -> None:
        self.pending = tokens[self.cached :]
        self.pending_features = self.features.inputs(self.cached, len(tokens))

    def propose(self) -> torch.Tensor:
        # drafting on, the draft reads its own predicted feature where the target's is not known
        logits, own = self.model.step(self.pending, self.pending_features, self.cache)
        self.pending_features = own[None]
        self.cached += len(self.pending)
        return logits

    def rollback(self, committed: int, accepted: int, drafted: int) -> None:
        # rows 0..accepted are the features of the positions committed before the next token; drafted
        # positions were cached from predicted features, so the draft keeps only the committed prefix
        self.features.extend(self.verified[: accepted + 1])
        self.cached = min(self.cached, committed)
        self.cache.crop(self.cached)
        self.features.drop_before(self.cached - 1)


def draft_adapter(draft, target) -> Draft:
    """The `Draft` that runs `draft` (a causal LM, a feature draft or None) beside `target`."""
    if draft is None:
        return Draft(target.device)
    if is_feature_draft(draft):
        return FeatureConditionedDraft(draft, target.config.hidden_size, target.device)
    return CausalDraft(draft, target.device)


class TokenClock:
    """Times each drafted token for a recorder, waiting for the device first. `NO_CLOCK` stands in when no
    recorder is attached: it reads no clock. `on` says a recorder is attached, which also wants the signals
    of every drafted token."""

    on = True

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def start(self) -> None:
        self.t0 = time.perf_counter()

    def stop(self, into: list[float]) -> None:
        synchronize(self.device)
        into.append((time.perf_counter() - self.t0) * 1e3)


class _NoClock:
    on = False

    def start(self) -> None:
        pass

    def stop(self, into: list[float]) -> None:
        pass


NO_CLOCK = _NoClock()


@dataclass
class Drafted:
    """One step's drafted tokens and what came with them (all trimmed together)."""

    tokens: list[int] = field(default_factory=list)
    probs: list[torch.Tensor] = field(default_factory=list)  # the sampling distributions (sampling only)
    signals: list[TokenSignals] = field(default_factory=list)  # a controller's or a recorder's
    draft_ms: list[float] = field(default_factory=list)  # per token, with a recorder only
    # distributions whose signals only a recorder wants, computed after drafting in one batch
    rows: list[torch.Tensor] = field(default_factory=list)


def choose_token(logits, config: DecodeConfig, generator, with_signals: bool, with_probs: bool):
    """(token, signals or None, distribution or None) from the draft's logits. Greedy: the argmax, with its
    signals from the same fused pass when `with_signals`, its softmax when `with_probs`; sampling: a token
    drawn from the sampling distribution (which verify_sampling needs as q)."""
    if not config.greedy:
        probs = logits_to_probs(logits, config)
        return sample(probs, generator), None, probs
    if with_signals:
        token, values = greedy_signals(logits)
        return token, values, None
    probs = torch.softmax(logits.float(), dim=-1) if with_probs else None
    return int(logits.argmax()), None, probs


def draft_tokens(
    draft: Draft, controller: Controller, budget: int, tokens: list[int], config, generator, clock
) -> Drafted:
    """Step 1: draft up to `budget` tokens after `tokens`, asking the controller after each one (never after
    the last, which the budget ends anyway); signals only a recorder wants are computed after, in one batch."""
    out = Drafted()
    if budget > 0:
        draft.start(tokens)
    for i in range(budget):
        clock.start()
        logits = draft.propose()
        last = i + 1 >= budget
        asks = controller.needs_signals and not last
        token, values, probs = choose_token(logits, config, generator, asks, clock.on)
        if not config.greedy:
            out.probs.append(probs)
        out.tokens.append(token)
        draft.feed(token)
        clock.stop(out.draft_ms)
        if not asks:
            if clock.on:
                out.rows.append(probs)
            continue
        if values is None:  # sampling: the sampled token under the sampling distribution
            (values,) = distribution_signals(probs[None], [token])
        out.signals.append(TokenSignals(*values, draft_index=i, position=len(tokens) + i))
        if not controller.keep_drafting(out.signals[-1]):
            break
    if out.rows:
        offset = len(out.signals)
        batch = distribution_signals(torch.stack(out.rows), out.tokens[offset:])
        out.signals.extend(
            TokenSignals(*values, draft_index=offset + j, position=len(tokens) + offset + j)
            for j, values in enumerate(batch)
        )
    return out


def trim(drafted: Drafted, controller: Controller) -> None:
    """The controller may verify fewer tokens than it drafted (their draft forwards are sunk)."""
    n_submit = submitted(controller, len(drafted.tokens))
    if n_submit < len(drafted.tokens):
        del drafted.tokens[n_submit:], drafted.probs[n_submit:]
        del drafted.signals[n_submit:], drafted.draft_ms[n_submit:]


def verify(drafted: Drafted, target_logits, config: DecodeConfig, generator):
    """Step 3: (accepted, the target's next token, min(1, p/q) per drafted token or None when greedy)."""
    if config.greedy:
        return (*verify_greedy(drafted.tokens, target_logits), None)
    target_probs = logits_to_probs(target_logits, config)
    return verify_sampling(drafted.tokens, drafted.probs, target_probs, generator)


def commit(
    new: list[int], tokens: list[int], result: GenerationResult, gamma: int, eos: frozenset[int]
) -> int:
    """Step 4: append the step's new tokens (the accepted drafts and the target's next token) up to an EOS,
    and the step's statistics to `result`; how many tokens were committed."""
    result.positions.append(len(tokens))
    result.gammas.append(gamma)
    result.accepts.append(len(new) - 1)
    produced = 0
    for tok in new:
        tokens.append(tok)
        result.token_ids.append(tok)
        produced += 1
        if tok in eos:
            result.stop_reason = "eos"
            break
    result.produced.append(produced)
    return produced


def step_context(
    result: GenerationResult, position: int, compression: str, confidence: TargetConfidence | None
) -> StepContext:
    """What the controller sees at the start of a step (the target's confidence is nan unless tracked)."""
    nan = float("nan")
    top1, entropy = confidence.last if confidence is not None else (nan, nan)
    return StepContext(
        step=result.steps,
        position=position,
        new_tokens=result.new_tokens,
        prev_gamma=result.gammas[-1] if result.gammas else 0,
        prev_accepted=result.accepts[-1] if result.accepts else 0,
        compression=compression,
        target_top1=top1,
        target_entropy=entropy,
        target_recent=confidence.recent_mean() if confidence is not None else nan,
    )


@torch.inference_mode()
def speculative_generate(
    target,
    draft,
    prompt_ids: list[int],
    controller: Controller,
    config: DecodeConfig,
    compression: str = "fp32",
    recorder: Recorder | None = None,
) -> GenerationResult:
    """Generate up to `config.max_new_tokens` tokens after `prompt_ids`; batch size 1, KV caches for both.

    With `draft=None` only a controller that never drafts (`none`) is valid. Timings chain without gaps (see
    GenerationResult); a recorder also gets each drafted token's time, which waits for the device.
    """
    config.validate()
    if not prompt_ids:
        raise SpeckvError("the prompt is empty")
    device = target.device
    eos = frozenset(config.eos_token_ids)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    controller.reset()
    confidence = TargetConfidence() if controller.needs_target_signals or recorder is not None else None
    clock = NO_CLOCK if recorder is None else TokenClock(device)

    synchronize(device)
    start = time.perf_counter()
    tokens = list(prompt_ids)
    target_cache = DynamicCache(config=target.config)
    drafter = draft_adapter(draft, target)
    if len(tokens) > 1:
        logits = drafter.prefill(target, tokens[:-1], target_cache)
        if confidence is not None:
            confidence.see_prefill(logits)
    result = GenerationResult(token_ids=[])
    synchronize(device)
    step_start = time.perf_counter()
    result.prefill_s = step_start - start

    while result.new_tokens < config.max_new_tokens:
        ctx = step_context(result, len(tokens), compression, confidence)
        budget = draft_budget(controller, ctx, config.gamma_max, config.max_new_tokens - result.new_tokens)
        if budget > 0 and draft is None:
            raise SpeckvError(f"controller {controller.name!r} drafts tokens but no draft model was given")
        # Step 1: draft, asking the controller after each token; then the controller's trim.
        drafted = draft_tokens(drafter, controller, budget, tokens, config, generator, clock)
        trim(drafted, controller)

        # Step 2: one target forward over the last committed token and every submitted token.
        t0 = time.perf_counter()
        result.draft_s.append(t0 - step_start)
        target_logits = drafter.verify(target, [tokens[-1]] + drafted.tokens, target_cache)
        # Step 3: accept a prefix and take the target's next token.
        accepted, next_token, accept_probs = verify(drafted, target_logits, config, generator)
        synchronize(device)
        result.verify_s.append(time.perf_counter() - t0)
        if confidence is not None:
            confidence.see_verify(target_logits, accepted)

        # Step 4: commit, then roll both caches back to the committed sequence.
        gamma, committed = len(drafted.tokens), len(tokens)
        produced = commit(drafted.tokens[:accepted] + [next_token], tokens, result, gamma, eos)
        truncate(target_cache, committed + accepted)
        drafter.rollback(committed, accepted, gamma)
        controller.observe(gamma, accepted)
        if recorder is not None:
            ms = result.verify_s[-1] * 1e3
            outcome = StepOutcome(
                ctx, drafted.signals, drafted.draft_ms, accepted, accept_probs, next_token, produced, ms
            )
            recorder.record_step(outcome)
        synchronize(device)
        step_end = time.perf_counter()
        result.step_s.append(step_end - step_start)
        step_start = step_end
        if result.stop_reason == "eos":
            break

    result.wall_s = step_start - start
    return result
