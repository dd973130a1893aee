import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tiny import save_pair  # noqa: E402


@pytest.fixture(scope="session")
def tiny_pair_dir(tmp_path_factory) -> tuple[Path, Path]:
    """(target_dir, draft_dir): a tiny Llama target and a noisy copy as draft, saved like real checkpoints."""
    return save_pair(tmp_path_factory.mktemp("tiny_pair"))


@pytest.fixture(scope="module")
def tiny_models(tiny_pair_dir):
    """(target, draft) of the tiny pair loaded on the CPU in fp32, one torch thread."""
    import torch
    from speckv.profiling.models import load_model

    torch.set_num_threads(1)
    target_dir, draft_dir = tiny_pair_dir
    device = torch.device("cpu")
    return load_model(str(target_dir), "target", device, "fp32"), load_model(str(draft_dir), "draft", device)
