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
