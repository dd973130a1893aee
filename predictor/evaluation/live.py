"""Live wall-clock runs: every controller in the real decode loop on the same prompts, interleaved.

Each run's time is split at its first token: time to first token (both models' prefill, whenever each
happens) and the decode phase after it, which is what a gamma controller controls.
Controllers take turns on each prompt (the order rotates from prompt to prompt) so that noise from other
jobs on the machine hits all of them alike. Greedy outputs are compared with `none` (the target alone):
the loop is lossless only if every one is token-identical. transformers' own assisted generation
(`generate(assistant_model=draft)`: its defaults, its `heuristic` schedule, and its own confidence stop at our
dev-tuned threshold) runs beside them as an outside reference, its output compared too.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from speckv.profiling.controllers import Controller
from speckv.profiling.decode import DecodeConfig, speculative_generate
from speckv.profiling.models import ModelPair, synchronize

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HFAssisted:
    """A live role that is not our controller: transformers' own `generate(assistant_model=draft)`, with
    these attributes set on the draft's generation_config for the run (empty: transformers' defaults)."""

    name: str
    settings: dict = field(default_factory=dict)
    assistant: object | None = field(default=None, compare=False)  # None: the pair's draft


Roles = dict[str, Controller | HFAssisted]  # role name -> what runs it live


def hf_role(name: str, gamma_max: int, threshold: float | None = None, assistant=None) -> HFAssisted:
    """`hf-assisted`: transformers' defaults (20 tokens, confidence stop 0.4 in transformers 5);
    `hf-heuristic`: its heuristic schedule; `hf-threshold`: its confidence stop at the dev-tuned threshold,
    drafting at most gamma_max tokens like our controllers."""
    if name == "hf-assisted":
        return HFAssisted(name, assistant=assistant)
    if name == "hf-heuristic":
        return HFAssisted(name, {"num_assistant_tokens_schedule": "heuristic"}, assistant)
    if name == "hf-threshold" and threshold is not None:
        settings = {
            "num_assistant_tokens_schedule": "constant",
            "num_assistant_tokens": gamma_max,
            "assistant_confidence_threshold": threshold,
        }
        return HFAssisted(name, settings, assistant)
    raise ValueError(f"unknown transformers role {name!r} (hf-threshold needs a tuned threshold)")


HF_ROLES = ("hf-assisted", "hf-heuristic", "hf-threshold")


class FirstTokenClock:
    """A generate() streamer that only notes when the first generated tokens arrive and how many: generate()
    hands it the prompt first, then each step's new tokens, so decoding itself is unchanged."""

    def __init__(self) -> None:
        self.calls = 0
        self.first_at: float | None = None
        self.first_tokens = 0

    def put(self, value: torch.Tensor) -> None:
        self.calls += 1
        if self.calls == 2:
            self.first_at = time.perf_counter()
            self.first_tokens = int(value.numel())

    def end(self) -> None:
        pass


def hf_assisted(pair: ModelPair, prompt_ids: list[int], config: DecodeConfig, settings: dict, assistant=None):
    """Greedy `target.generate(assistant_model=assistant or the pair's draft)`: (new token ids, wall seconds,
    seconds to the first token, tokens of the first step).

    The draft's generation_config is restored afterwards: the heuristic schedule writes its state back
    into it, which would leak from one prompt into the next.
    """
    draft = assistant if assistant is not None else pair.draft
    saved = copy.deepcopy(draft.generation_config)
    for key, value in settings.items():
        setattr(draft.generation_config, key, value)
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=pair.device)
    clock = FirstTokenClock()
    try:
        synchronize(pair.device)
        start = time.perf_counter()
        with torch.inference_mode():
            out = pair.target.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                assistant_model=draft,
                do_sample=False,
                max_new_tokens=config.max_new_tokens,
                eos_token_id=list(config.eos_token_ids) or None,
                pad_token_id=pair.tokenizer.pad_token_id or (config.eos_token_ids or (0,))[0],
                streamer=clock,
            )
        synchronize(pair.device)
        wall_s = time.perf_counter() - start
    finally:
        draft.generation_config = saved
    ttft_s = (clock.first_at - start) if clock.first_at is not None else wall_s
    return out[0, len(prompt_ids) :].tolist(), wall_s, ttft_s, clock.first_tokens


def _trim_after_eos(tokens: list[int], eos: tuple[int, ...]) -> list[int]:
    for i, tok in enumerate(tokens):
        if tok in eos:
            return tokens[: i + 1]
    return tokens


def run_prompt(
    pair: ModelPair, prompt_ids: list[int], roles: Roles, config: DecodeConfig, rotate: int
) -> dict[str, dict]:
    """One prompt under every role, in an order rotated by `rotate`; per role its summary and token ids."""
    names = list(roles)
    order = names[rotate % len(names) :] + names[: rotate % len(names)]
    out = {}
    for name in order:
        role = roles[name]
        if isinstance(role, HFAssisted):
            tokens, wall_s, ttft_s, first = hf_assisted(
                pair, prompt_ids, config, role.settings, role.assistant
            )
            tokens = _trim_after_eos(tokens, config.eos_token_ids)
            decode_tokens, decode_s = max(0, len(tokens) - first), wall_s - ttft_s
            out[name] = {
                "new_tokens": len(tokens),
                "wall_s": wall_s,
                "tokens_per_s": len(tokens) / wall_s,
                "ttft_s": ttft_s,
                "decode_tokens": decode_tokens,
                "decode_s": decode_s,
                "decode_tokens_per_s": decode_tokens / decode_s if decode_s > 0 else 0.0,
                "token_ids": tokens,
            }
        else:
            result = speculative_generate(pair.target, pair.draft, prompt_ids, role, config, pair.compression)
            out[name] = {**result.summary(), "token_ids": result.token_ids}
    return out


def run_live(
    pair: ModelPair,
    prompts: list[dict],
    roles: Roles,
    config: DecodeConfig,
    warmup_tokens: int,
    run_of: dict[str, str] | None = None,
    between: Callable[[int], None] | None = None,
) -> list[dict]:
    """Per prompt × role rows (tokens/s, acceptance, matches_none) on `pair`; `roles` must include none.

    `run_of` maps further role names to a role in `roles` that runs the same controller (a tuned role that
    resolved to another one): they get rows of that run, marked in `run_of`, instead of a run of their own.
    `between(n)` runs before the n-th prompt and once more (n = len(prompts)) after the last: timings that
    must share the live runs' machine state (live_clock.LiveClock)."""
    run_of = dict(run_of or {})
    unknown = sorted(name for name, source in run_of.items() if source not in roles or name in roles)
    if unknown:
        raise ValueError(f"run_of names roles that are not shared runs: {unknown}")
    if "none" not in roles:
        raise ValueError("live runs need the `none` role: it is the reference output and speedup base")
    if warmup_tokens > 0 and prompts:
        warm = DecodeConfig(**{**config.__dict__, "max_new_tokens": warmup_tokens})
        run_prompt(pair, prompts[0]["input_ids"], roles, warm, 0)
    from tqdm import tqdm

    rows = []
    bar = tqdm(prompts, desc=f"live {pair.compression} ({len(roles)} policies)", unit="prompt")
    for n, prompt in enumerate(bar):
        if between is not None:
            between(n)
        results = run_prompt(pair, prompt["input_ids"], roles, config, n)
        reference = results["none"]["token_ids"]
        for name, source in run_of.items():
            results[name] = dict(results[source])
        for name, summary in results.items():
            tokens = summary.pop("token_ids")
            role = roles[run_of.get(name, name)]
            spec = f"{role.name}{json.dumps(role.settings)}" if isinstance(role, HFAssisted) else role.name
            rows.append(
                {
                    "prompt_id": prompt["prompt_id"],
                    "task": prompt["task"],
                    "compression": pair.compression,
                    "policy": name,
                    "spec": spec,
                    **summary,
                    "matches_none": tokens == reference,
                    "run_of": run_of.get(name, name),
                }
            )
        log.info(
            "live %s %s: %s",
            pair.compression,
            prompt["prompt_id"],
            ", ".join(f"{k} {v['decode_tokens_per_s']:.1f}" for k, v in results.items()),
        )
    if between is not None:
        between(len(prompts))
    return rows
