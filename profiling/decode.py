"""The one speculative decoding loop: profiling, deployment and evaluation all run `speculative_generate`.

Speculative decoding (Leviathan et al. 2023, arXiv 2211.17192; Chen et al. 2023, arXiv 2302.01318):
  1. the draft proposes tokens one at a time, a controller deciding after each one whether to go on;
  2. the target scores the last committed token and every drafted token in one forward pass;
  3. greedy: accept the longest drafted prefix equal to the target's argmax; sampling: accept token i with
     probability min(1, p_i/q_i), on the first rejection resample from norm(max(0, p - q));
  4. append the target's own next token (the correction, or the bonus token when all were accepted),
     and roll both KV caches back to the committed sequence.
The output distribution is exactly the target's, so greedy output equals target-only greedy output.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

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
from speckv.profiling.models import synchronize
from speckv.profiling.signals import (
    RECENT_TOKENS,
    TokenSignals,
    distribution_signals,
    greedy_signals,
    target_signals,
)
from transformers import DynamicCache


@dataclass(frozen=True)
class DecodeConfig:
    max_new_tokens: int = 128  # generated tokens, EOS included
    gamma_max: int = 8  # hard cap on tokens drafted per step, whatever the controller says
    temperature: float = 0.0  # 0 is greedy
    top_k: int = 0  # 0 keeps every token
    top_p: float = 1.0  # 1.0 keeps every token
    seed: int = 0  # seeds the sampling generator (unused when greedy)
    eos_token_ids: tuple[int, ...] = ()  # generation stops after any of these

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise SpeckvError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.gamma_max < 1:
            raise SpeckvError(f"gamma_max must be >= 1, got {self.gamma_max}")
        if self.temperature < 0:
            raise SpeckvError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise SpeckvError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise SpeckvError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class StepOutcome:
    """Everything one step produced, handed to a recorder (built only when a recorder is attached)."""

    ctx: StepContext
    signals: list[TokenSignals]  # one per drafted token
    draft_ms: list[float]  # one per drafted token
    accepted: int  # drafted tokens the target accepted
    accept_probs: list[float] | None  # min(1, p/q) per drafted token (sampling only)
    target_token: int  # correction or bonus token
    produced: int  # tokens appended after EOS / max_new_tokens truncation
    verify_ms: float


class Recorder(Protocol):
    def record_step(self, outcome: StepOutcome) -> None: ...


@dataclass
class GenerationResult:
    """Tokens, per-step statistics and timings of one generation.

    Timings chain without gaps: wall_s = prefill_s + sum(step_s). The first token is committed at
    the end of step 0, so time to first token covers both models' prompt prefill (the target's before step
    0, the draft's lazily on the first token it drafts) and the decode phase is every later step: what a
    gamma controller controls.
    """

    token_ids: list[int]  # generated tokens only
    gammas: list[int] = field(default_factory=list)  # drafted per step
    accepts: list[int] = field(default_factory=list)  # accepted per step
    produced: list[int] = field(default_factory=list)  # tokens committed per step (after EOS/length cuts)
    positions: list[int] = field(default_factory=list)  # context length at each step's start
    step_s: list[float] = field(default_factory=list)  # wall time of each step: draft, verify, commit
    draft_s: list[float] = field(
        default_factory=list
    )  # per step, up to the verify: controller and draft forwards
    verify_s: list[float] = field(default_factory=list)  # per step: the target's verify forward
    prefill_s: float = (
        0.0  # up to step 0: cache set-up and the target's prefill (all prompt tokens but the last)
    )
    wall_s: float = 0.0
    stop_reason: str = "length"  # "eos" or "length"

    @property
    def new_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def steps(self) -> int:
        return len(self.gammas)

    @property
    def drafted(self) -> int:
        return sum(self.gammas)

    @property
    def accepted(self) -> int:
        return sum(self.accepts)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted_per_step(self) -> float:
        return self.accepted / self.steps if self.steps else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def decode_s(self) -> float:
        """Wall time after the first token: every step but the first."""
        return float(sum(self.step_s[1:]))

    @property
    def ttft_s(self) -> float:
        return self.wall_s - self.decode_s

    @property
    def decode_tokens(self) -> int:
        return self.new_tokens - (self.produced[0] if self.produced else 0)

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0

    def summary(self) -> dict:
        return {
            "new_tokens": self.new_tokens,
            "steps": self.steps,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "acceptance_rate": self.acceptance_rate,
            "mean_accepted_per_step": self.mean_accepted_per_step,
            "wall_s": self.wall_s,
            "tokens_per_s": self.tokens_per_s,
            "ttft_s": self.ttft_s,
            "decode_tokens": self.decode_tokens,
            "decode_s": self.decode_s,
            "decode_tokens_per_s": self.decode_tokens_per_s,
            "stop_reason": self.stop_reason,
        }


def _forward(model, ids: list[int], cache: DynamicCache, device: torch.device, all_logits: bool):
    """Feed `ids` after what `cache` holds; logits of the last position (or of every position)."""
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    out = model(
        input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=0 if all_logits else 1
    )
    return out.logits[0] if all_logits else out.logits[0, -1]


def _truncate(cache: DynamicCache, length: int) -> None:
    """Drop cached positions beyond `length` (DynamicCache.crop takes a negative count in transformers 5)."""
    excess = cache.get_seq_length() - length
    if excess > 0:
        cache.crop(-excess)


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

    With `draft=None` only a controller that never drafts (`none`) is valid.
    """
    config.validate()
    if not prompt_ids:
        raise SpeckvError("the prompt is empty")
    device = target.device
    greedy = config.greedy
    eos = frozenset(config.eos_token_ids)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    controller.reset()
    wants_target = controller.needs_target_signals or recorder is not None
    # a feature draft reads the target's final hidden states, which every target forward then returns
    feature_draft = is_feature_draft(draft)
    target_forward = forward_with_features if feature_draft else _forward

    synchronize(device)
    start = time.perf_counter()
    tokens = list(prompt_ids)
    target_cache = DynamicCache(config=target.config)
    if draft is None:
        draft_cache = None
    else:
        draft_cache = FeatureCache() if feature_draft else DynamicCache(config=draft.config)
    features = TargetFeatures(target.config.hidden_size, device) if feature_draft else None
    confidence = (float("nan"), float("nan"))  # the target's (top1, entropy) where it chose tokens[-1]
    recent: deque[float] = deque(maxlen=RECENT_TOKENS)  # its top-1 for the last committed tokens
    if len(tokens) > 1:
        logits = target_forward(target, tokens[:-1], target_cache, device, all_logits=False)
        if feature_draft:
            logits, hidden = logits
            features.extend(hidden)
        if wants_target:
            (confidence,) = target_signals(logits[None])
            recent.append(confidence[0])
    draft_len = 0  # positions held by the draft cache; it is filled lazily, so `none` never pays for it
    result = GenerationResult(token_ids=[])
    prev_gamma = prev_accepted = 0
    synchronize(device)
    step_start = time.perf_counter()
    result.prefill_s = step_start - start

    while result.new_tokens < config.max_new_tokens:
        ctx = StepContext(
            step=result.steps,
            position=len(tokens),
            new_tokens=result.new_tokens,
            prev_gamma=prev_gamma,
            prev_accepted=prev_accepted,
            compression=compression,
            target_top1=confidence[0],
            target_entropy=confidence[1],
            target_recent=sum(recent) / len(recent) if recent else float("nan"),
        )
        budget = draft_budget(controller, ctx, config.gamma_max, config.max_new_tokens - result.new_tokens)
        if budget > 0 and draft is None:
            raise SpeckvError(f"controller {controller.name!r} drafts tokens but no draft model was given")

        # Step 1: draft up to `budget` tokens, asking the controller after each one.
        drafted: list[int] = []
        draft_probs: list[torch.Tensor] = []
        signals: list[TokenSignals] = []
        draft_ms: list[float] = []
        pending = tokens[draft_len:]
        if feature_draft and budget > 0:
            pending_features = features.inputs(draft_len, len(tokens))
        draft_rows: list[torch.Tensor] = []  # the draft's distributions, for signals computed after drafting
        for i in range(budget):
            t0 = time.perf_counter() if recorder is not None else 0.0
            if feature_draft:
                # drafting on, the draft reads its own predicted feature where the target's is not known
                logits, own = draft.step(pending, pending_features, draft_cache)
                pending_features = own[None]
            else:
                logits = _forward(draft, pending, draft_cache, device, all_logits=False)
            draft_len += len(pending)
            last = i + 1 >= budget
            values = None  # the token's signals, when the controller will be asked about it
            if greedy:
                # the controller is never asked about the last token, so only a recorder needs its signals
                if controller.needs_signals and not last:
                    token, values = greedy_signals(logits)  # token and signals in one fused pass
                else:
                    token = int(logits.argmax())
                recorded = recorder is not None and values is None  # a recorder's batch needs the row
                probs = torch.softmax(logits.float(), dim=-1) if recorded else None
            else:
                probs = logits_to_probs(logits, config)
                token = sample(probs, generator)
                draft_probs.append(probs)
            drafted.append(token)
            pending = [token]
            if recorder is not None:
                synchronize(device)
                draft_ms.append((time.perf_counter() - t0) * 1e3)
            if last:
                if recorder is not None:
                    draft_rows.append(probs)
                break
            if controller.needs_signals:
                if values is None:  # sampling: the sampled token under the sampling distribution
                    (values,) = distribution_signals(probs[None], [token])
                signals.append(TokenSignals(*values, draft_index=i, position=len(tokens) + i))
                if not controller.keep_drafting(signals[-1]):
                    break
            elif recorder is not None:
                draft_rows.append(probs)
        if draft_rows:
            # a recorder alone wants signals: compute them for the whole draft at once, off the token path
            offset = len(signals)
            batch = distribution_signals(torch.stack(draft_rows), drafted[offset:])
            signals.extend(
                TokenSignals(*values, draft_index=offset + j, position=len(tokens) + offset + j)
                for j, values in enumerate(batch)
            )

        # Trim: the controller may verify fewer tokens than it drafted (their draft forwards are sunk).
        if drafted:
            n_submit = submitted(controller, len(drafted))
            if n_submit < len(drafted):
                del drafted[n_submit:], draft_probs[n_submit:], signals[n_submit:], draft_ms[n_submit:]

        # Step 2: one target forward over the last committed token and every submitted token.
        t0 = time.perf_counter()
        result.draft_s.append(t0 - step_start)
        target_logits = target_forward(target, [tokens[-1]] + drafted, target_cache, device, all_logits=True)
        if feature_draft:
            target_logits, verify_hidden = target_logits

        # Step 3: accept a prefix and take the target's next token.
        accept_probs = None
        if greedy:
            n_accepted, next_token = verify_greedy(drafted, target_logits)
        else:
            target_probs = logits_to_probs(target_logits, config)
            n_accepted, next_token, accept_probs = verify_sampling(
                drafted, draft_probs, target_probs, generator
            )
        synchronize(device)
        result.verify_s.append(time.perf_counter() - t0)
        verify_ms = result.verify_s[-1] * 1e3
        if wants_target:
            # rows 0..n_accepted chose the tokens committed now: the accepted drafts and the next token; only
            # the last RECENT_TOKENS of them can reach the running window
            committed_stats = target_signals(
                target_logits[max(0, n_accepted + 1 - RECENT_TOKENS) : n_accepted + 1]
            )
            recent.extend(row[0] for row in committed_stats)
            confidence = committed_stats[-1]

        # Step 4: commit, then roll both caches back to the committed sequence.
        k = len(drafted)
        committed = len(tokens)
        new = drafted[:n_accepted] + [next_token]
        produced = 0
        for tok in new:
            tokens.append(tok)
            result.token_ids.append(tok)
            produced += 1
            if tok in eos:
                result.stop_reason = "eos"
                break
        _truncate(target_cache, committed + n_accepted)
        if feature_draft:
            # rows 0..n_accepted are the features of the positions committed before the next token; drafted
            # positions were cached from predicted features, so the draft keeps only the committed prefix
            features.extend(verify_hidden[: n_accepted + 1])
            draft_len = min(draft_len, committed)
            draft_cache.crop(draft_len)
            features.drop_before(draft_len - 1)
        elif k:
            draft_len = min(draft_len, committed + n_accepted)
            _truncate(draft_cache, draft_len)
        result.gammas.append(k)
        result.accepts.append(n_accepted)
        result.produced.append(produced)
        result.positions.append(committed)
        controller.observe(k, n_accepted)
        if recorder is not None:
            recorder.record_step(
                StepOutcome(ctx, signals, draft_ms, n_accepted, accept_probs, next_token, produced, verify_ms)
            )
        synchronize(device)
        step_end = time.perf_counter()
        result.step_s.append(step_end - step_start)
        step_start = step_end
        prev_gamma, prev_accepted = k, n_accepted
        if result.stop_reason == "eos":
            break

    result.wall_s = step_start - start
    return result
