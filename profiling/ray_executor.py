"""Profiling jobs as Ray tasks: the same stage on one machine or a cluster, writing the same part files.

Each job (one recorder run, or one batch of traces; profiling.profile.plan_jobs) becomes one task that
declares its CPUs (and a GPU when the models run on CUDA). A task loads the pair once per worker process and
keeps it for the next job of the same compression, which is what an actor per worker would buy without
its bookkeeping. Part files are written by the worker straight into the shared output directory, each
atomically, so a worker killed mid-job leaves none half-written and a rerun resumes like the local executor.
The driver shows one progress bar and, on the first failure, cancels what is left and names the job's units.

With no address a local Ray instance is started, sized to this machine (or to `num_cpus`); pass an address
("auto", "ray://host:10001", ...) to run on an existing cluster whose workers see the same output directory
and can import this package.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

from speckv.profiling.errors import SpeckvError
from speckv.profiling.profile import Job, run_job

log = logging.getLogger(__name__)

CANCEL_WAIT_S = 60.0  # how long a failed run waits for its cancelled tasks to end
_PAIRS: dict[tuple, object] = {}  # per worker process: the pair of the last spec it ran


@dataclass(frozen=True)
class PairSpec:
    """How a worker loads the pair (profiling.models.load_pair arguments) and how many threads it uses."""

    target: str
    draft: str | None
    compression: str
    device: str | None
    cpu_kernels: bool
    threads: int
    draft_compression: str | None = None  # the draft's compression (None: its own dtype)


def _worker_pair(spec: PairSpec):
    import torch
    from speckv.profiling.models import load_pair

    torch.set_num_threads(spec.threads)
    if spec not in _PAIRS:
        _PAIRS.clear()  # one pair per worker: a new compression replaces the last one
        _PAIRS[spec] = load_pair(
            spec.target, spec.draft, spec.compression, spec.device, spec.cpu_kernels, spec.draft_compression
        )
    return _PAIRS[spec]


def _run(spec: PairSpec, job: Job) -> dict[str, int]:
    return run_job(_worker_pair(spec), job)


class RayExecutor:
    """Callable executor for profiling.profile.run_profile: every job a Ray task with `threads` CPUs."""

    def __init__(
        self,
        spec: PairSpec,
        address: str | None = None,
        num_cpus: int | None = None,
        gpus_per_task: float = 0.0,
    ) -> None:
        try:
            import ray
        except ImportError:
            raise SpeckvError(
                "profile.executor ray needs Ray: pip install 'speckv[ray]' (or choose executor local)"
            ) from None
        self.ray = ray
        self.spec = spec
        self.gpus_per_task = gpus_per_task
        if not ray.is_initialized():
            if address:
                ray.init(address=address, log_to_driver=False)
            else:
                ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=False)
        self._task = ray.remote(_run).options(num_cpus=spec.threads, num_gpus=gpus_per_task, max_retries=0)

    def __call__(self, jobs: list[Job], on_done: Callable[[Job, dict[str, int]], None]) -> None:
        ray = self.ray
        pending = {self._task.remote(self.spec, job): job for job in jobs}
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                job = pending.pop(done[0])
                try:
                    rows = ray.get(done[0])
                except Exception as exc:  # RayTaskError wraps the worker's exception; WorkerCrashedError etc.
                    cause = getattr(exc, "cause", None) or exc
                    raise SpeckvError(
                        f"profile {job.compression} job {', '.join(job.keys)} failed on a Ray worker: "
                        f"{type(cause).__name__}: {str(cause).strip().splitlines()[-1] if str(cause).strip() else ''}"
                    ) from exc
                on_done(job, rows)
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)
            if pending:
                # cancellation is asynchronous: wait until no cancelled task can still write a part file, so
                # the caller's clean-up of temporary files (and a rerun) never races a dying worker
                ray.wait(list(pending), num_returns=len(pending), timeout=CANCEL_WAIT_S)
