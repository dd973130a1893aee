"""The calibrate and profile stages' settings: one dataclass each, built from its section of params.yaml, with
the checks that fail a run before any model loads."""

from __future__ import annotations

from dataclasses import dataclass, field

from speckv.profiling.decode import DecodeConfig
from speckv.profiling.errors import SpeckvError
from speckv.profiling.models import COMPRESSIONS

EXECUTORS = ("local", "ray")  # how profile runs its jobs: here, one after another, or as Ray tasks


@dataclass
class CalibrateConfig:
    target: str = "default"  # target model reference
    draft: str = "default"  # draft model reference
    draft_compression: str | None = None  # null: the draft's own dtype; same: the target's; or a compression
    compressions: list[str] = field(default_factory=lambda: ["fp32", "int8", "nf4"])
    gamma_max: int = 8  # verify costs are measured for 1..gamma_max+1 tokens
    prompts: str = "artifacts/prompts/prompts.jsonl"  # dev prompts: the calibration runs' contexts
    loop_prompts: int = 6  # dev prompts, spread over the prompt lengths, each decoded at every fixed gamma
    max_new_tokens: int = 32  # tokens per calibration run
    repeats: int = 15  # timed repeats of the isolated forwards kept beside the model (median)
    warmup: int = 3  # untimed repeats first
    out_dir: str = "artifacts/calibrate"  # {compression}.json and cost_model.png
    threads: int = 2  # torch CPU threads
    cpu_kernels: bool = (
        True  # few-row fp32 kernels (profiling/kernels.py), float32 int8/nf4 weights (quant_kernels.py)
    )
    device: str | None = None  # null: CUDA when present, else CPU

    def validate(self) -> None:
        if self.loop_prompts < 1 or self.max_new_tokens < 2:
            raise SpeckvError("calibrate.loop_prompts must be >= 1 and calibrate.max_new_tokens >= 2")


@dataclass
class ProfileConfig:
    target: str = "default"  # target model reference
    draft: str = "default"  # draft model reference
    draft_compression: str | None = None  # null: the draft's own dtype; same: the target's; or a compression
    compressions: list[str] = field(default_factory=lambda: ["fp32", "int8", "nf4"])  # one run each
    prompts: str = "artifacts/prompts/prompts.jsonl"  # tokenized prompt file with splits
    per_task: dict = field(
        default_factory=lambda: {"train": 2}
    )  # prompts per task and split run through the decode loop with the recorder on (timings, sampling, paper)
    controllers: list[str] = field(default_factory=lambda: ["fixed:8"])  # full drafts label every position
    gamma_max: int = 8  # most tokens drafted per step
    max_new_tokens: int = 48  # generated tokens per prompt
    temperature: float = 0.0  # 0 is greedy; > 0 records sampling runs with acceptance probabilities
    top_k: int = 0  # sampling only; 0 keeps all tokens
    top_p: float = 1.0  # sampling only
    seed: int = 0  # sampling generator seed
    trace_per_task: dict = field(
        default_factory=lambda: {"train": 20, "dev": 10, "test": 10}
    )  # prompts per task and split with a dense greedy trace (the predictor's rows, replay, the oracle)
    trace_batch: int = 48  # target continuations decoded together when tracing
    executor: str = (
        "local"  # local: jobs one after another here; ray: each job a Ray task (profiling/ray_executor.py)
    )
    ray_address: str | None = (
        None  # null: start a local Ray instance sized to this machine; else a cluster address
    )
    ray_threads: int = 1  # CPUs (torch threads) each Ray task declares and uses
    out_dir: str = "artifacts/profile"  # tokens/, steps/, traces/ (hive: compression=/task=)
    threads: int = 2  # torch CPU threads
    cpu_kernels: bool = (
        True  # few-row fp32 kernels (profiling/kernels.py), float32 int8/nf4 weights (quant_kernels.py)
    )
    device: str | None = None  # null: CUDA when present, else CPU

    def validate(self) -> None:
        for name in ("per_task", "trace_per_task"):
            if not set(getattr(self, name)) <= {"train", "dev", "test"}:
                raise SpeckvError(
                    f"profile.{name} keys must be train/dev/test, got {sorted(getattr(self, name))}"
                )
        if self.trace_batch < 1:
            raise SpeckvError(f"profile.trace_batch must be >= 1, got {self.trace_batch}")
        if self.executor not in EXECUTORS:
            raise SpeckvError(
                f"profile.executor must be one of {', '.join(EXECUTORS)}, got {self.executor!r}"
            )
        if self.ray_threads < 1:
            raise SpeckvError(f"profile.ray_threads must be >= 1, got {self.ray_threads}")

    def decode_config(self) -> DecodeConfig:
        """The decode settings of the recorded runs (EOS tokens come with the pair), checked."""
        return DecodeConfig.checked_from(self)


def select_compressions(configured: list[str], requested: str | None) -> list[str]:
    """The compressions to run: `requested` alone if given, else the configured ones; all known."""
    chosen = [requested] if requested else configured
    bad = [c for c in chosen if c not in COMPRESSIONS]
    if bad:
        raise SpeckvError(f"unknown compression(s) {bad}; expected some of {', '.join(COMPRESSIONS)}")
    return chosen
