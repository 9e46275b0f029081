import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PROJECT_ROOT", str(ROOT))
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def compose_cfg(tmp_path):
    """Compose a real config (train / eval / reference) with outputs under tmp_path."""

    def _compose(name: str, *overrides: str):
        with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
            return compose(name, overrides=[f"paths.output_dir={tmp_path / 'run'}",
                                             f"paths.log_dir={tmp_path / 'logs'}", *overrides])

    return _compose


@pytest.fixture
def one_thread(monkeypatch):
    """torch on one thread, and processes launched by the test start with one (2 cores, several processes)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield
    torch.set_num_threads(threads)
