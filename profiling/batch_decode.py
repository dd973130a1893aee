"""Batched speculative decoding: B prompts decode together, one draft forward per drafted position and one
target forward per step for the whole batch.

Per row the algorithm is `speculative_generate`'s (Leviathan et al. 2023, arXiv 2211.17192; decode.py), with
the same drafting, acceptance and commit functions; the batch shares the forwards, as vLLM batches them:
  1. every active row asks its own controller for a budget; the step runs as many draft forwards as the
     largest budget, each over every row still drafting; a row stops proposing when its budget is spent or
     its controller says stop, and the controller may trim what it drafted;
  2. ONE target forward verifies B x (gamma + 1) tokens, gamma the most tokens any row submits (shorter rows
     are padded);
  3. each row accepts its own prefix (greedy: the longest argmax match; sampling: min(1, p/q), then the
     residual) with its own generator;
  4. each row commits its tokens and rolls both KV caches back by lowering its own length (RowCache); rows
     that reach EOS or max_new_tokens leave the batch.
Every row's greedy output equals the target's own greedy output for its prompt. Batch size 1 is what
`speculative_generate` runs, unchanged; this function serves B >= 1 with causal LM drafts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from speckv.profiling.controllers import Controller, draft_budget
from speckv.profiling.decode import Drafted, choose_token, commit, step_context, trim, verify
from speckv.profiling.errors import SpeckvError
from speckv.profiling.feature_draft import is_feature_draft
from speckv.profiling.generation import DecodeConfig, GenerationResult
from speckv.profiling.kv_cache import forward
from speckv.profiling.models import synchronize
from speckv.profiling.row_cache import RowCache, row_forward
from speckv.profiling.signals import TargetConfidence, TokenSignals, distribution_signals
from transformers import DynamicCache

__all__ = ["BatchResult", "speculative_generate_batch"]


@dataclass
class BatchResult:
    """Each prompt's tokens and statistics, and the batch's own timings.

    A row's `GenerationResult` holds its tokens and per-step statistics; its `step_s`, `draft_s` and
    `verify_s` are the timings of the batch steps it took part in (a row's step lasts as long as the
    batch's), so its `decode_tokens_per_s` is that row's own rate. Batch timings chain without gaps:
    wall_s = prefill_s + sum(step_s), prefill_s covering every prompt's target prefill.
    """

    rows: list[GenerationResult]  # one per prompt, in order
    batch_sizes: list[int] = field(default_factory=list)  # rows decoding in each step
    gammas: list[int] = field(
        default_factory=list
    )  # per step: most tokens a row submitted (verify width - 1)
    draft_forwards: list[int] = field(default_factory=list)  # per step: draft forwards over the batch
    draft_s: list[float] = field(default_factory=list)  # per step, up to the verify: controllers and drafting
    verify_s: list[float] = field(default_factory=list)  # per step: the target's forward and acceptance
    step_s: list[float] = field(default_factory=list)  # per step: draft, verify, commit, retiring rows
    prefill_s: float = 0.0
    wall_s: float = 0.0

    @property
    def steps(self) -> int:
        return len(self.step_s)

    @property
    def new_tokens(self) -> int:
        return sum(row.new_tokens for row in self.rows)

    @property
    def decode_s(self) -> float:
        """Wall time after the first step, which commits every row's first token (as GenerationResult)."""
        return float(sum(self.step_s[1:]))

    @property
    def decode_tokens(self) -> int:
        """Tokens committed after the first step, over all rows."""
        return sum(row.decode_tokens for row in self.rows)

    @property
    def decode_tokens_per_s(self) -> float:
        """The batch's decode throughput: tokens of every row per second of decode wall time."""
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0

    @property
    def acceptance_rate(self) -> float:
        drafted = sum(row.drafted for row in self.rows)
        return sum(row.accepted for row in self.rows) / drafted if drafted else 0.0


@dataclass
class _Row:
    """One prompt's decoding state while it is in the batch."""

    result: GenerationResult
    tokens: list[int]  # prompt and committed tokens
    controller: Controller
    generator: torch.Generator
    confidence: TargetConfidence | None
    budget: int = 0  # this step's draft budget
    drafted: Drafted = field(default_factory=Drafted)

    def done(self, config: DecodeConfig) -> bool:
        return self.result.stop_reason == "eos" or self.result.new_tokens >= config.max_new_tokens


def check_inputs(draft, prompts: list[list[int]], controllers: list[Controller]) -> None:
    """One clear error for what a batch cannot decode."""
    if not prompts:
        raise SpeckvError("no prompts to decode")
    empty = [i for i, ids in enumerate(prompts) if not ids]
    if empty:
        raise SpeckvError(f"prompt {empty[0]} of {len(prompts)} is empty")
    if len(controllers) != len(prompts):
        raise SpeckvError(f"{len(controllers)} controllers for {len(prompts)} prompts: give one per prompt")
    if len({id(c) for c in controllers}) != len(controllers):
        raise SpeckvError("each prompt needs its own controller object (controllers keep per-sequence state)")
    if draft is not None and is_feature_draft(draft):
        raise SpeckvError(
            "batched decoding runs causal LM drafts; decode with a feature draft one prompt at a time "
            "(speculative_generate)"
        )


def prefill(target, rows: list[_Row], device: torch.device) -> RowCache:
    """Each prompt but its last token through the target alone, exactly as speculative_generate prefills it
    (so a quantized target's prompt arithmetic does not depend on the batch), stacked into one RowCache."""
    caches = []
    for row in rows:
        cache = DynamicCache(config=target.config)
        if len(row.tokens) > 1:
            logits = forward(target, row.tokens[:-1], cache, device, all_logits=False)
            if row.confidence is not None:
                row.confidence.see_prefill(logits)
        caches.append(cache)
    return RowCache.stack(caches, target.config)


def propose(row: _Row, logits: torch.Tensor, config: DecodeConfig, argmax: int | None) -> bool:
    """Step 1 for one row, as decode.draft_tokens: choose its next drafted token from the draft's `logits`,
    asking its controller whether to draft another (never after the budget's last); whether the row drafts
    on. `argmax` is the row's greedy token when the batch's argmax already gave it."""
    index = len(row.drafted.tokens)
    last = index + 1 >= row.budget
    asks = row.controller.needs_signals and not last
    if argmax is not None and not asks:
        token, values, probs = argmax, None, None
    else:
        token, values, probs = choose_token(logits, config, row.generator, asks, False)
    out = row.drafted
    if not config.greedy:
        out.probs.append(probs)
    out.tokens.append(token)
    if not asks:
        return not last
    if values is None:  # sampling: the sampled token under the sampling distribution
        (values,) = distribution_signals(probs[None], [token])
    out.signals.append(TokenSignals(*values, draft_index=index, position=len(row.tokens) + index))
    return row.controller.keep_drafting(out.signals[-1])


def draft_batch(draft, cache: RowCache | None, rows: list[_Row], config: DecodeConfig) -> int:
    """Step 1 for the batch: draft forwards over every row until no row drafts on; how many forwards ran.

    A row's first forward of the step feeds every committed token its draft cache lacks (the whole prompt the
    first time: the draft is prefilled lazily, as in speculative_generate), later ones the token it just
    drafted; rows not drafting feed nothing, and their slots are padding."""
    feeds = [row.tokens[n:] if row.budget else [] for row, n in zip(rows, cache.lengths, strict=True)]
    forwards = 0
    while any(feeds):
        logits = row_forward(draft, cache, feeds, all_logits=False)
        forwards += 1
        argmax = logits.argmax(dim=-1).tolist() if config.greedy else [None] * len(rows)
        feeds = [
            [row.drafted.tokens[-1]] if feed and propose(row, logits[b], config, argmax[b]) else []
            for b, (row, feed) in enumerate(zip(rows, feeds, strict=True))
        ]
    return forwards


def start_step(rows: list[_Row], draft, config: DecodeConfig, compression: str) -> None:
    """Each row's step context and draft budget (capped as in speculative_generate)."""
    for row in rows:
        ctx = step_context(row.result, len(row.tokens), compression, row.confidence)
        tokens_left = config.max_new_tokens - row.result.new_tokens
        row.budget = draft_budget(row.controller, ctx, config.gamma_max, tokens_left)
        row.drafted = Drafted()
        if row.budget > 0 and draft is None:
            raise SpeckvError(
                f"controller {row.controller.name!r} drafts tokens but no draft model was given"
            )


@torch.inference_mode()
def speculative_generate_batch(
    target,
    draft,
    prompts: list[list[int]],
    controllers: list[Controller],
    config: DecodeConfig,
    compression: str = "fp32",
) -> BatchResult:
    """Generate up to `config.max_new_tokens` tokens after each of `prompts`, decoding them as one batch.

    `controllers` holds one controller per prompt (their own objects: controllers keep per-sequence
    state). With `draft=None` only controllers that never draft are valid. Sampling draws row i's tokens from
    its own generator, seeded `config.seed + i`, so a run is reproducible whatever else the batch holds.
    """
    config.validate()
    check_inputs(draft, prompts, controllers)
    device = target.device
    eos = frozenset(config.eos_token_ids)
    rows = []
    for i, (ids, controller) in enumerate(zip(prompts, controllers, strict=True)):
        controller.reset()
        tracks = controller.needs_target_signals
        rows.append(
            _Row(
                result=GenerationResult(token_ids=[]),
                tokens=list(ids),
                controller=controller,
                generator=torch.Generator(device=device).manual_seed(config.seed + i),
                confidence=TargetConfidence() if tracks else None,
            )
        )
    out = BatchResult(rows=[row.result for row in rows])

    synchronize(device)
    start = time.perf_counter()
    target_cache = prefill(target, rows, device)
    draft_cache = RowCache(draft.config, len(rows)) if draft is not None else None
    synchronize(device)
    step_start = time.perf_counter()
    out.prefill_s = step_start - start

    active = rows
    while active:
        # Step 1: every row's budget, then draft forwards over the batch until no row drafts on; trims.
        start_step(active, draft, config, compression)
        forwards = draft_batch(draft, draft_cache, active, config) if draft_cache is not None else 0
        for row in active:
            trim(row.drafted, row.controller)

        # Step 2: one target forward over each row's last committed token and its submitted tokens.
        t0 = time.perf_counter()
        feeds = [[row.tokens[-1]] + row.drafted.tokens for row in active]
        target_logits = row_forward(target, target_cache, feeds, all_logits=True)
        # Step 3: each row accepts its own prefix and takes the target's next token.
        outcomes = [
            verify(row.drafted, target_logits[b, : len(feed)], config, row.generator)
            for b, (row, feed) in enumerate(zip(active, feeds, strict=True))
        ]
        synchronize(device)
        verify_s = time.perf_counter() - t0

        # Step 4: commit each row, then roll its caches back to its committed sequence.
        for b, (row, (accepted, next_token, _)) in enumerate(zip(active, outcomes, strict=True)):
            if row.confidence is not None:
                row.confidence.see_verify(target_logits[b, : len(feeds[b])], accepted)
            gamma, committed = len(row.drafted.tokens), len(row.tokens)
            commit(row.drafted.tokens[:accepted] + [next_token], row.tokens, row.result, gamma, eos)
            target_cache.lengths[b] = committed + accepted
            if draft_cache is not None:
                draft_cache.lengths[b] = min(draft_cache.lengths[b], committed + accepted)
            row.controller.observe(gamma, accepted)
        keep = [b for b, row in enumerate(active) if not row.done(config)]
        if len(keep) < len(active):
            target_cache.keep_rows(keep)
            if draft_cache is not None:
                draft_cache.keep_rows(keep)
        synchronize(device)
        step_end = time.perf_counter()

        out.batch_sizes.append(len(active))
        out.gammas.append(max(map(len, feeds)) - 1)
        out.draft_forwards.append(forwards)
        out.draft_s.append(t0 - step_start)
        out.verify_s.append(verify_s)
        out.step_s.append(step_end - step_start)
        for row in active:
            row.result.draft_s.append(out.draft_s[-1])
            row.result.verify_s.append(verify_s)
            row.result.step_s.append(out.step_s[-1])
        active = [active[b] for b in keep]
        step_start = step_end

    out.wall_s = step_start - start
    for row in rows:
        row.result.prefill_s = out.prefill_s
        row.result.wall_s = out.prefill_s + sum(row.result.step_s)
    return out
