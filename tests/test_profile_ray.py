"""The Ray executor writes the same part files as the local one, and a failed run resumes to the same union."""

import pytest
import ray
import torch
from speckv.profiling import profile as prof
from speckv.profiling.errors import SpeckvError
from speckv.profiling.models import load_pair
from speckv.profiling.ray_executor import PairSpec, RayExecutor
from test_profile import DECODE, META, PROMPTS, same_tables

pytestmark = pytest.mark.slow  # a local Ray instance takes seconds to start

MORE = [
    {"prompt_id": f"code/r{i}", "task": "code", "split": "dev", "input_ids": list(range(20 + i, 34 + i))}
    for i in range(3)
]


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)  # 2 workers, 1 CPU each
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def pair(tiny_pair_dir):
    target, draft = tiny_pair_dir
    return load_pair(str(target), str(draft), "fp32", "cpu")


def spec(tiny_pair_dir) -> PairSpec:
    target, draft = tiny_pair_dir
    return PairSpec(str(target), str(draft), "fp32", "cpu", True, 1)


def profile(pair, out, prompts, executor=None):
    """Local runs use the Ray tasks' one thread: the reduction order of a kernel depends on the thread count,
    so with different counts the float signals would differ in their last bits (tokens and labels would not)."""
    traced = [p for p in prompts if p["split"] in ("dev", "test")]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return prof.run_profile(
            pair,
            prompts,
            ["fixed:6"],
            DECODE,
            out,
            traced,
            META,
            progress=False,
            trace_batch=1,
            executor=executor,
        )
    finally:
        torch.set_num_threads(threads)


def test_ray_writes_the_local_tables(pair, tiny_pair_dir, tmp_path, local_ray):
    prompts = PROMPTS + MORE
    profile(pair, tmp_path / "local", prompts)
    counts = profile(pair, tmp_path / "ray", prompts, RayExecutor(spec(tiny_pair_dir)))
    assert counts["units_done"] == len(prompts) + len([p for p in prompts if p["split"] != "train"])
    same_tables(tmp_path / "local", tmp_path / "ray")


def test_a_failed_unit_is_named_and_the_rerun_resumes(pair, tiny_pair_dir, tmp_path, local_ray):
    bad = {
        **MORE[1],
        "input_ids": [10, 11, 10_000],
    }  # a token id outside the tiny vocabulary: the worker raises
    broken = PROMPTS + [MORE[0], bad, MORE[2]]
    with pytest.raises(SpeckvError, match=r"code_r1--.* failed on a Ray worker"):
        profile(pair, tmp_path / "ray", broken, RayExecutor(spec(tiny_pair_dir)))
    assert not list((tmp_path / "ray").rglob(".part-*"))  # nothing half-written, not even by a cancelled task
    counts = profile(pair, tmp_path / "ray", PROMPTS + MORE, RayExecutor(spec(tiny_pair_dir)))
    assert counts["units_skipped"] >= 1 and counts["units_done"] >= 1
    profile(pair, tmp_path / "local", PROMPTS + MORE)
    same_tables(tmp_path / "local", tmp_path / "ray")
