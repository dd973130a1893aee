"""Profiling runs: prompts × controllers through the decode loop with the recorder on, plus dense traces,
written as hive-partitioned Parquet part files (compression=/task=) that a killed run resumes from.

Each unit of work (one prompt under one controller, or one prompt's trace) is one part file per table,
written to a temporary name and renamed, so a part either exists whole or not at all. Part names carry a
fingerprint of everything that shapes the rows (the traces tag moves when their arithmetic does); parts of
another fingerprint are stale and removed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq
from speckv.profiling.atomic import atomic_path
from speckv.profiling.controllers import parse_controller
from speckv.profiling.decode import DecodeConfig, speculative_generate
from speckv.profiling.errors import SpeckvError
from speckv.profiling.models import model_fingerprint
from speckv.profiling.recorder import TableRecorder
from speckv.profiling.schema import PARTITION_KEYS, STEP_SCHEMA, TOKEN_SCHEMA, TRACE_SCHEMA
from speckv.profiling.traces import batched_traces

if TYPE_CHECKING:
    from speckv.profiling.stage_config import ProfileConfig

log = logging.getLogger(__name__)

TABLES = {"tokens": TOKEN_SCHEMA, "steps": STEP_SCHEMA, "traces": TRACE_SCHEMA}


@dataclass(frozen=True)
class Unit:
    """One part file's worth of work."""

    prompt: dict  # a row of the prompt file: prompt_id, task, split, input_ids
    controller: str | None  # None: the prompt's dense trace

    @property
    def key(self) -> str:
        what = "trace" if self.controller is None else self.controller
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{self.prompt['prompt_id']}--{what}")


def fingerprint(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def part_path(out_dir: Path, table: str, compression: str, task: str, fp: str, key: str) -> Path:
    return out_dir / table / f"compression={compression}" / f"task={task}" / f"part-{fp}-{key}.parquet"


def check_writable(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir):
            pass
    except OSError as exc:
        raise SpeckvError(f"output directory {out_dir} is not writable: {exc}") from exc


def write_part(table: pa.Table, path: Path, metadata: dict[str, str]) -> None:
    """Write atomically: a temporary file in the same directory, then a rename."""
    # compression and task live in the hive directory names; storing them twice confuses dataset readers
    table = table.drop_columns([c for c in PARTITION_KEYS if c in table.column_names])
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def check_part(path: Path, schema: pa.Schema) -> None:
    """A part file that exists must be readable Parquet with the expected columns."""
    try:
        found = pq.read_schema(path)
    except (OSError, pa.ArrowException) as exc:
        raise SpeckvError(f"corrupt part file {path}: {exc}; delete it and rerun") from exc
    expected = [(f.name, f.type) for f in schema if f.name not in ("compression", "task")]
    got = [(f.name, f.type) for f in found if f.name not in ("compression", "task")]
    if got != expected:
        raise SpeckvError(
            f"part file {path} does not match the {schema.names[:3]}... schema; delete it and rerun"
        )


def remove_stale(out_dir: Path, compression: str, fp: str, keys: set[str]) -> int:
    """Delete this compression's part files from other settings or other prompts, and leftover temp files."""
    removed = 0
    wanted = {f"part-{fp}-{key}.parquet" for key in keys}
    for table in TABLES:
        root = out_dir / table / f"compression={compression}"
        if not root.is_dir():
            continue
        for path in root.rglob("*.parquet"):
            if path.name not in wanted:
                path.unlink()
                removed += 1
    return removed


def remove_temporary(out_dir: Path, compression: str) -> int:
    """Delete this compression's temporary part files (atomic_path names them `.part-...`)."""
    removed = 0
    for table in TABLES:
        for path in (out_dir / table / f"compression={compression}").glob("task=*/.part-*"):
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def plan_units(prompts: list[dict], controllers: list[str], trace_prompts: list[dict]) -> Iterator[Unit]:
    for prompt in prompts:
        for spec in controllers:
            yield Unit(prompt, spec)
    for prompt in trace_prompts:
        yield Unit(prompt, None)


@dataclass(frozen=True)
class Job:
    """Units that run together: one recorder run, or up to trace_batch traces decoded as one batch.

    Everything a worker needs besides the models travels with it, so a job runs the same in this process or
    on a Ray worker, and its part files are the same bytes either way.
    """

    compression: str
    units: tuple[tuple[Unit, dict[str, Path]], ...]  # each unit with its part paths, table -> path
    decode: DecodeConfig
    metadata: dict[str, str]
    trace_batch: int

    @property
    def keys(self) -> list[str]:
        return [u.key for u, _ in self.units]


def plan_jobs(
    units: list[Unit],
    out_dir: Path,
    compression: str,
    fp: str,
    decode: DecodeConfig,
    metadata: dict,
    trace_batch: int,
) -> tuple[list[Job], int]:
    """The jobs of the units not finished yet (a unit is finished when all its part files exist) and the
    count of finished ones. Pending traces are chunked in plan order, so every executor batches alike."""
    jobs, traces, skipped = [], [], 0

    def job(chunk: list) -> Job:
        return Job(compression, tuple(chunk), decode, metadata, trace_batch)

    for unit in units:
        tables = ("traces",) if unit.controller is None else ("tokens", "steps")
        paths = {t: part_path(out_dir, t, compression, unit.prompt["task"], fp, unit.key) for t in tables}
        if all(path.exists() for path in paths.values()):
            for t, path in paths.items():
                check_part(path, TABLES[t])
            skipped += 1
        elif unit.controller is None:
            traces.append((unit, paths))
            if len(traces) == trace_batch:
                jobs.append(job(traces))
                traces = []
        else:
            jobs.append(job([(unit, paths)]))
    if traces:
        jobs.append(job(traces))
    return jobs, skipped


def run_job(pair, job: Job) -> dict[str, int]:
    """Run one job on a loaded pair and write its part files (each atomically); rows written per table."""
    decode, compression = job.decode, job.compression
    counts = {"tokens": 0, "steps": 0, "traces": 0}

    def run_of(p: dict) -> dict[str, str]:
        return {
            "prompt_id": p["prompt_id"],
            "task": p["task"],
            "split": p["split"],
            "compression": compression,
        }

    (first, paths), *_ = job.units
    if first.controller is None:
        tables = batched_traces(
            pair.target,
            pair.draft,
            [u.prompt["input_ids"] for u, _ in job.units],
            decode.gamma_max,
            decode.max_new_tokens,
            decode.eos_token_ids,
            [run_of(u.prompt) for u, _ in job.units],
            batch_size=job.trace_batch,
        )
        for (_, unit_paths), table in zip(job.units, tables, strict=True):
            write_part(table, unit_paths["traces"], job.metadata)
            counts["traces"] += table.num_rows
        return counts
    p = first.prompt
    mode = "greedy" if decode.greedy else "sampling"
    controller = parse_controller(first.controller, decode.gamma_max, compression)
    recorder = TableRecorder({**run_of(p), "controller": first.controller, "mode": mode}, len(p["input_ids"]))
    speculative_generate(pair.target, pair.draft, p["input_ids"], controller, decode, compression, recorder)
    # steps first: a unit counts as done only when its tokens part exists too
    write_part(recorder.step_table(), paths["steps"], job.metadata)
    write_part(recorder.token_table(), paths["tokens"], job.metadata)
    counts["tokens"] += recorder.token_table().num_rows
    counts["steps"] += recorder.step_table().num_rows
    return counts


class LocalExecutor:
    """Runs the jobs one after another in this process, on the pair already loaded here."""

    def __init__(self, pair) -> None:
        self.pair = pair

    def __call__(self, jobs: list[Job], on_done: Callable[[Job, dict[str, int]], None]) -> None:
        for job in jobs:
            on_done(job, run_job(self.pair, job))


def run_meta(cfg: ProfileConfig, pair, draft_compression: str | None) -> dict:
    """What a pair's profiling rows depend on beyond the decode settings: the models' sources and weights,
    the compressions, device, attention and kernels, the library versions, the prompts and the seed. Part
    files of a run whose meta differs are stale (`run_profile` fingerprints it)."""
    import platform

    import torch
    import transformers

    return {
        "target": model_fingerprint(cfg.target, "target"),
        "draft": model_fingerprint(cfg.draft, "draft"),
        "compression": pair.compression,
        **({"draft_compression": draft_compression} if draft_compression else {}),
        "device": str(pair.device),
        # what shapes the rows beyond the models: a change here makes earlier part files stale
        "attention": pair.target.config._attn_implementation,
        "cpu_kernels": cfg.cpu_kernels,
        # the kernels' memory plan changes a summation order or two; "full" (the usual) is left out so
        # earlier part files stay valid
        **({"kernel_plan": pair.kernels} if pair.kernels in ("lean", "off") else {}),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "prompts": cfg.prompts,
        "seed": cfg.seed,
    }


def run_profile(
    pair,
    prompts: list[dict],
    controllers: list[str],
    decode: DecodeConfig,
    out_dir: Path,
    trace_prompts: list[dict],
    run_meta: dict,
    progress: bool = True,
    trace_batch: int = 48,
    executor: Callable | None = None,
) -> dict[str, int]:
    """Profile every prompt under every controller, and trace `trace_prompts` densely (greedy only; their
    target continuations decoded `trace_batch` prompts at a time).

    `executor` runs the jobs: LocalExecutor(pair) by default, or profiling.ray_executor.RayExecutor, which
    runs them as Ray tasks (same part files). Returns counts of rows written, units done and units skipped
    because a previous run finished them.
    """
    from tqdm import tqdm

    compression = pair.compression
    for spec in controllers:  # fail before any model work on a bad spec
        parse_controller(spec, decode.gamma_max, compression)
    check_writable(out_dir)
    for table in TABLES:  # every table directory exists, empty when no unit writes it (e.g. traces only)
        (out_dir / table).mkdir(exist_ok=True)
    fp = fingerprint(
        {**run_meta, "decode": asdict(decode), "controllers": controllers, "traces": "batched-v2"}
    )
    units = list(plan_units(prompts, controllers, trace_prompts if decode.greedy else []))
    removed = remove_stale(out_dir, compression, fp, {u.key for u in units})
    if removed:
        log.info("removed %d part files of other settings or prompts", removed)
    metadata = {"speckv": json.dumps({**run_meta, "fingerprint": fp, "decode": asdict(decode)})}
    jobs, skipped = plan_jobs(units, out_dir, compression, fp, decode, metadata, trace_batch)
    counts = {"tokens": 0, "steps": 0, "traces": 0, "units_done": 0, "units_skipped": skipped}
    bar = tqdm(
        total=len(units), initial=skipped, desc=f"profile {compression}", unit="run", disable=not progress
    )

    def on_done(job: Job, rows: dict[str, int]) -> None:
        for table, n in rows.items():
            counts[table] += n
        counts["units_done"] += len(job.units)
        bar.update(len(job.units))

    try:
        (executor or LocalExecutor(pair))(jobs, on_done)
    except BaseException:
        remove_temporary(out_dir, compression)  # a worker killed mid-write leaves its temporary file
        raise
    finally:
        bar.close()
    return counts
