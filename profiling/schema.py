"""Arrow schemas of the profiling tables: drafted tokens, steps, and dense greedy traces.

Units are in the names (`_ms`, nats for entropy). `compression` and `task` are hive partition keys on disk;
pyarrow.dataset / pandas restore them as columns.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
from speckv.profiling.errors import SpeckvError
from speckv.profiling.signals import SIGNALS, running_columns

# Columns that identify a run; every table carries them.
RUN_FIELDS = [
    pa.field("prompt_id", pa.string(), nullable=False),
    pa.field("task", pa.string(), nullable=False),
    pa.field("split", pa.string(), nullable=False),  # train / dev / test, by prompt
    pa.field("compression", pa.string(), nullable=False),  # target compression: fp32, fp16, bf16, int8, nf4
    pa.field("controller", pa.string(), nullable=False),  # controller spec that produced the run
    pa.field("mode", pa.string(), nullable=False),  # greedy or sampling
]

TOKEN_SCHEMA = pa.schema(
    RUN_FIELDS
    + [
        pa.field("step", pa.int32(), nullable=False),
        pa.field("draft_index", pa.int16(), nullable=False),  # 0-based index within the step's draft
        pa.field("gamma", pa.int16(), nullable=False),  # tokens drafted in this step (known only afterwards)
        pa.field("position", pa.int32(), nullable=False),  # context position of the drafted token
        pa.field("new_index", pa.int32(), nullable=False),  # position minus prompt length
    ]
    + [pa.field(s, pa.float32(), nullable=False) for s in SIGNALS]
    + [pa.field(c, pa.float32(), nullable=False) for c in running_columns()]
    + [
        pa.field("prev_gamma", pa.int16(), nullable=False),  # previous step's drafted count (0 on step 0)
        pa.field("prev_accepted", pa.int16(), nullable=False),  # previous step's accepted count (0 on step 0)
        pa.field("target_top1", pa.float32(), nullable=False),  # StepContext.target_top1 of the step
        pa.field("target_entropy", pa.float32(), nullable=False),  # StepContext.target_entropy (nats)
        pa.field("target_recent", pa.float32(), nullable=False),  # StepContext.target_recent
        pa.field("accepted", pa.bool_(), nullable=False),  # the target accepted this token
        pa.field("labelled", pa.bool_(), nullable=False),  # up to and including the first rejection
        pa.field("accept_prob", pa.float32(), nullable=True),  # min(1, p_target/p_draft); null when greedy
        pa.field("draft_ms", pa.float32(), nullable=False),  # wall time of the draft forward for this token
    ]
)

STEP_SCHEMA = pa.schema(
    RUN_FIELDS
    + [
        pa.field("step", pa.int32(), nullable=False),
        pa.field("position", pa.int32(), nullable=False),  # context length when the step started
        pa.field("gamma", pa.int16(), nullable=False),  # tokens drafted
        pa.field("accepted", pa.int16(), nullable=False),  # drafted tokens the target accepted
        pa.field("produced", pa.int16(), nullable=False),  # tokens appended (after EOS / max_new_tokens)
        pa.field("target_token", pa.int32(), nullable=False),  # the target's correction or bonus token
        pa.field("prev_gamma", pa.int16(), nullable=False),
        pa.field("prev_accepted", pa.int16(), nullable=False),
        pa.field("target_top1", pa.float32(), nullable=False),  # the target's confidence at step start
        pa.field("target_entropy", pa.float32(), nullable=False),
        pa.field("target_recent", pa.float32(), nullable=False),
        pa.field("draft_ms", pa.float32(), nullable=False),  # all draft forwards of the step
        pa.field("verify_ms", pa.float32(), nullable=False),  # the target's single verify forward
    ]
)

# Dense greedy traces: at every position of the target's greedy continuation, the draft's greedy
# continuation of gamma_max tokens. Greedy speculative output does not depend on the gamma policy, so
# any controller can be replayed exactly from these rows.
TRACE_SCHEMA = pa.schema(
    [f for f in RUN_FIELDS if f.name not in ("controller", "mode")]
    + [
        pa.field("new_index", pa.int32(), nullable=False),  # tokens generated before this position
        pa.field("position", pa.int32(), nullable=False),  # context length at this position
        pa.field("target_token", pa.int32(), nullable=False),  # the target's greedy token here
        pa.field("draft_tokens", pa.list_(pa.int32()), nullable=False),  # draft's greedy gamma_max tokens
        pa.field("match_len", pa.int16(), nullable=False),  # leading draft tokens equal to the target's
        pa.field("n_new", pa.int32(), nullable=False),  # length of the target's continuation
        # the target's top-1 probability / entropy (nats) of the distribution that chose the token before this
        # position (for new_index 0 the last prompt token): known at step start, before any drafting
        pa.field("target_top1", pa.float32(), nullable=False),
        pa.field("target_entropy", pa.float32(), nullable=False),
    ]
    + [pa.field(s, pa.list_(pa.float32()), nullable=False) for s in SIGNALS]
)

PARTITION_KEYS = ("compression", "task")  # hive directory levels of every table


def read_table(path: Path, table: str) -> pa.Table:
    """Read a profiling table directory (hive-partitioned) with its declared schema."""
    import pyarrow.dataset as ds

    if not path.is_dir():
        raise SpeckvError(f"{table} table not found: {path}")
    try:
        partitioning = ds.partitioning(pa.schema([(k, pa.string()) for k in PARTITION_KEYS]), flavor="hive")
        return ds.dataset(path, format="parquet", partitioning=partitioning).to_table()
    except (OSError, pa.ArrowException) as exc:
        raise SpeckvError(f"cannot read the {table} table at {path}: {exc}") from exc
