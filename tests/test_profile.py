"""Profiling tables: schema and partitioning, labels that match the loop, exact trace replay, resume."""

from __future__ import annotations

import pyarrow.dataset as ds
import pytest
import yaml
from speckv.pipeline.cli import main
from speckv.profiling import profile as prof
from speckv.profiling.controllers import parse_controller
from speckv.profiling.decode import DecodeConfig, speculative_generate
from speckv.profiling.errors import SpeckvError
from speckv.profiling.models import load_pair
from speckv.profiling.schema import STEP_SCHEMA, TOKEN_SCHEMA, TRACE_SCHEMA, read_table

PROMPTS = [
    {"prompt_id": "code/a", "task": "code", "split": "train", "input_ids": list(range(10, 30))},
    {"prompt_id": "math/b", "task": "math", "split": "dev", "input_ids": list(range(40, 52))},
    {"prompt_id": "chat/c", "task": "chat", "split": "test", "input_ids": list(range(60, 85))},
]
DECODE = DecodeConfig(max_new_tokens=20, gamma_max=6)
META = {"target": "tiny", "draft": "tiny"}
TIMING = {"draft_ms", "verify_ms"}


@pytest.fixture(scope="module")
def pair(tiny_pair_dir):
    target, draft = tiny_pair_dir
    return load_pair(str(target), str(draft), "fp32", "cpu")


def profile(pair, out, controllers=("fixed:6",)):
    traced = [p for p in PROMPTS if p["split"] in ("dev", "test")]
    return prof.run_profile(
        pair, PROMPTS, list(controllers), DECODE, out, traced, META, progress=False, trace_batch=2
    )


def read(out, table):
    return read_table(out / table, table).to_pandas()


def test_schema_and_partitioning(pair, tmp_path):
    counts = profile(pair, tmp_path)
    assert counts["units_done"] == 5  # 3 runs + 2 traces
    for table, schema in [("tokens", TOKEN_SCHEMA), ("steps", STEP_SCHEMA), ("traces", TRACE_SCHEMA)]:
        dataset = ds.dataset(tmp_path / table, format="parquet", partitioning="hive")
        assert set(dataset.schema.names) == set(schema.names)
        df = dataset.to_table().to_pandas()
        assert df["prompt_id"].notna().all()
        assert set(df["compression"].astype(str)) == {"fp32"}
    dirs = sorted(p.relative_to(tmp_path / "tokens").as_posix() for p in (tmp_path / "tokens").glob("*/*"))
    assert dirs == ["compression=fp32/task=chat", "compression=fp32/task=code", "compression=fp32/task=math"]
    traces = read(tmp_path, "traces")
    assert set(traces["split"]) == {"dev", "test"}  # train prompts get no trace
    meta = ds.dataset(tmp_path / "tokens", format="parquet").files[0]
    import pyarrow.parquet as pq

    assert b"speckv" in pq.read_schema(meta).metadata


def test_labels_match_the_decode_loop(pair, tmp_path):
    profile(pair, tmp_path)
    tokens, steps = read(tmp_path, "tokens"), read(tmp_path, "steps")
    for p in PROMPTS:
        live = speculative_generate(
            pair.target, pair.draft, p["input_ids"], parse_controller("fixed:6", 6), DECODE
        )
        s = steps[steps.prompt_id == p["prompt_id"]].sort_values("step")
        assert s["accepted"].tolist() == live.accepts
        assert s["gamma"].tolist() == live.gammas
        t = tokens[tokens.prompt_id == p["prompt_id"]]
        assert t.groupby("step")["accepted"].sum().tolist() == [
            a for a, g in zip(live.accepts, live.gammas, strict=True) if g
        ]
        assert (t[t.labelled].groupby("step")["accepted"].apply(lambda x: (~x).sum())).le(1).all()


def replay_fixed(trace, k: int) -> list[int]:
    rows = trace.sort_values("new_index")
    match = rows["match_len"].tolist()
    n = int(rows["n_new"].iloc[0])
    accepts, i = [], 0
    while i < n:
        g = min(k, n - i - 1)
        a = min(match[i], g)
        accepts.append(a)
        i += a + 1
    return accepts


@pytest.mark.parametrize("k", [1, 3, 6])
def test_trace_replay_equals_live_fixed_gamma(pair, tmp_path_factory, k):
    out = tmp_path_factory.mktemp(f"trace{k}")
    profile(pair, out)
    traces = read(out, "traces")
    for p in PROMPTS[1:]:
        live = speculative_generate(
            pair.target, pair.draft, p["input_ids"], parse_controller(f"fixed:{k}", 6), DECODE
        )
        trace = traces[traces.prompt_id == p["prompt_id"]]
        assert replay_fixed(trace, k) == live.accepts
        assert trace.sort_values("new_index")["target_token"].tolist() == live.token_ids


def test_kill_and_resume_gives_the_same_rows(pair, tmp_path, monkeypatch):
    whole = tmp_path / "whole"
    profile(pair, whole, controllers=("fixed:6", "fixed:2"))
    resumed = tmp_path / "resumed"
    real_write = prof.write_part
    tokens_parts = []

    def dying_write(table, path, metadata):
        if path.relative_to(resumed).parts[0] == "tokens":
            tokens_parts.append(path)
            if len(tokens_parts) == 2:  # one unit whole, the next with its steps part but not its tokens part
                raise KeyboardInterrupt
        return real_write(table, path, metadata)

    monkeypatch.setattr(prof, "write_part", dying_write)
    with pytest.raises(KeyboardInterrupt):
        profile(pair, resumed, controllers=("fixed:6", "fixed:2"))
    monkeypatch.setattr(prof, "write_part", real_write)
    counts = profile(pair, resumed, controllers=("fixed:6", "fixed:2"))
    assert counts["units_skipped"] == 1
    same_tables(whole, resumed)


def test_a_worker_killed_mid_write_leaves_no_temporary_file(pair, tmp_path):
    """A force-killed worker (a cancelled Ray task) never reaches atomic_path's clean-up: the failed run
    removes the temporary part file it left, and the rerun finishes the unit."""

    def killed_executor(jobs, on_done):
        job = jobs[0]
        (_, paths), *_ = job.units
        path = next(iter(paths.values()))
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.parent / f".{path.name}.k1ll3d.parquet").write_bytes(b"PAR1 half")  # what a killed write leaves
        raise RuntimeError("worker died")

    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="worker died"):
        prof.run_profile(
            pair, PROMPTS, ["fixed:6"], DECODE, out, [], META, progress=False, executor=killed_executor
        )
    assert not list(out.rglob(".part-*"))
    counts = prof.run_profile(pair, PROMPTS, ["fixed:6"], DECODE, out, [], META, progress=False)
    assert counts["units_done"] == len(PROMPTS)


def test_traces_only_still_makes_every_table_directory(pair, tmp_path):
    """profile.per_task: {} runs no recorder: tokens/ and steps/ exist empty (DVC declares all three outputs)."""
    traced = [p for p in PROMPTS if p["split"] == "test"]
    counts = prof.run_profile(pair, [], ["fixed:6"], DECODE, tmp_path, traced, META, progress=False)
    assert counts["units_done"] == 1 and counts["tokens"] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["steps", "tokens", "traces"]
    assert not any((tmp_path / "tokens").iterdir()) and list((tmp_path / "traces").rglob("part-*.parquet"))


def same_tables(a_dir, b_dir) -> None:
    """Every table equal row for row after sorting (timings aside), no duplicate rows, the same part files
    (so the same units and fingerprints)."""
    for table in ("tokens", "steps", "traces"):
        a, b = read(a_dir, table), read(b_dir, table)
        cols = [c for c in a.columns if c not in TIMING]
        keys = [c for c in ("prompt_id", "controller", "step", "draft_index", "new_index") if c in cols]
        a = a[cols].sort_values(keys).reset_index(drop=True)
        b = b[cols].sort_values(keys).reset_index(drop=True)
        assert len(a) == len(b) == len(a.drop_duplicates(keys)), table
        assert a.astype(str).equals(b.astype(str)), table
    assert {p.name for p in a_dir.rglob("*.parquet")} == {p.name for p in b_dir.rglob("*.parquet")}


def test_changed_settings_replace_stale_parts(pair, tmp_path):
    profile(pair, tmp_path, controllers=("fixed:6",))
    profile(pair, tmp_path, controllers=("fixed:2",))
    assert set(read(tmp_path, "tokens")["controller"]) == {"fixed:2"}


def test_corrupt_part_is_named(pair, tmp_path):
    profile(pair, tmp_path)
    victim = sorted((tmp_path / "tokens").rglob("*.parquet"))[0]
    victim.write_bytes(b"not parquet")
    with pytest.raises(SpeckvError, match=victim.name):
        profile(pair, tmp_path)


def test_unwritable_out_dir_and_bad_controller(pair, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SpeckvError, match="not writable"):
        profile(pair, blocker / "out")
    with pytest.raises(SpeckvError, match="unknown controller"):
        profile(pair, tmp_path / "o", controllers=("sometimes",))


def test_cli_bad_inputs(tiny_pair_dir, tmp_path, capsys):
    target, draft = tiny_pair_dir
    params = {
        "profile": {
            "target": str(target),
            "draft": str(draft),
            "prompts": str(tmp_path / "missing.jsonl"),
            "out_dir": str(tmp_path / "out"),
            "threads": 1,
        }
    }
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    assert main(["profile", "--params", str(path), "--no-progress"]) == 2
    assert "missing.jsonl" in capsys.readouterr().err
    assert main(["profile", "--params", str(path), "--compression", "int3"]) == 2
    assert "unknown compression" in capsys.readouterr().err
    params["profile"]["gamma_max"] = "eight"
    path.write_text(yaml.safe_dump(params))
    assert main(["profile", "--params", str(path)]) == 2
    assert "gamma_max" in capsys.readouterr().err


def test_cost_model_is_monotone_in_verified_tokens():
    from speckv.profiling.costfit import monotone

    assert monotone([60.0, 66.0, 70.0]) == [60.0, 66.0, 70.0]
    assert monotone([60.0, 80.0, 70.0, 90.0]) == [60.0, 75.0, 75.0, 90.0]
    smoothed = monotone([61.7, 105.4, 116.4, 95.3, 121.1, 109.4, 129.3, 99.5, 111.8])
    assert all(a <= b for a, b in zip(smoothed, smoothed[1:], strict=False))
    assert sum(smoothed) == pytest.approx(61.7 + 105.4 + 116.4 + 95.3 + 121.1 + 109.4 + 129.3 + 99.5 + 111.8)


def test_verify_sizes_take_turns_so_a_burst_of_load_inflates_none_of_them(pair, monkeypatch):
    """A fake clock where a forward costs its token count, and 4x that for the first 40% of all calls (a
    neighbour's burst): timed one size after another, the first sizes would read 4x; interleaved, every
    size's median is its true cost."""
    from speckv.profiling import calibrate as cal

    class Clock:
        now, calls = 0.0, 0

    sizes, repeats, warmup = [1, 2, 3, 4, 5], 9, 1
    burst = 0.4 * len(sizes) * (repeats + warmup)
    context = list(range(10, 30))

    def fake_forward(model, new, cache, device, all_logits):
        if len(new) < len(context):
            Clock.calls += 1
            Clock.now += len(new) * (4.0 if Clock.calls <= burst else 1.0) / 1e3

    monkeypatch.setattr(cal, "forward", fake_forward)
    monkeypatch.setattr(cal.time, "perf_counter", lambda: Clock.now)
    measured = cal.verify_ms_interleaved(pair.target, context, sizes, repeats, warmup)
    assert measured == pytest.approx([1.0, 2.0, 3.0, 4.0, 5.0])
    assert Clock.calls == len(sizes) * (repeats + warmup)
