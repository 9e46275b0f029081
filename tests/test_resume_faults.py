"""Fault injection: `python train.py` is killed (SIGKILL, no cleanup) at random moments and rerun until a run
finishes; the checkpoint then equals an uninterrupted run's byte for byte, with the same per-block statistics.

The kill moments are drawn from a seed printed with any failure (VQ4DIT_FAULT_SEED=<seed> repeats them), uniformly
over the part of an uninterrupted run after the imports, so they land in pool sampling, block fits, cache writes
and the checkpoint's write alike. Each rerun is a new run folder that resumes from the shared block cache.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["model=dit_tiny", "model.arch.num_layers=4", "method=vq4dit", "quant.k=16", "quant.d=2", "fit.iterations=16",
        "pool.trajectories=2", "pool.size=48", "pool.heldout_trajectories=1", "pool.heldout_size=16",
        "sampler.steps=3", "log_samples=0", "trainer.enable_progress_bar=false"]


def _start(run_dir: Path, logs: Path) -> subprocess.Popen:
    env = {**os.environ, "PROJECT_ROOT": str(ROOT), "PYTHONPATH": str(ROOT / "src")}
    env.pop("OMP_NUM_THREADS", None)  # the default thread count: what a user gets
    return subprocess.Popen([sys.executable, "train.py", *ARGS, f"paths.log_dir={logs}", f"hydra.run.dir={run_dir}"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _finish(process: subprocess.Popen) -> None:
    _, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]


def _checkpoint(run_dir: Path) -> tuple[bytes, list]:
    ckpt = run_dir / "checkpoint"
    return (ckpt / "model.safetensors").read_bytes(), json.loads((ckpt / "manifest.json").read_text())["blocks"]


def kill_and_resume(tmp_path: Path, kills: int) -> None:
    seed = int(os.environ.get("VQ4DIT_FAULT_SEED", random.SystemRandom().randrange(2**32)))
    rng = random.Random(seed)
    began = time.time()
    whole = _start(tmp_path / "whole", tmp_path / "logs_whole")
    _finish(whole)
    duration = time.time() - began
    logs, history = tmp_path / "logs_killed", []
    for i in range(kills):
        process = _start(tmp_path / f"killed_{i}", logs)
        delay = rng.uniform(0.35, 1.0) * duration  # the first third is mostly imports
        try:
            process.wait(timeout=delay)
            history.append(f"run {i} finished before its kill at {delay:.1f} s")
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            cached = sorted(p.name for p in logs.glob("train/cache/*/block_*.safetensors"))
            history.append(f"run {i} killed at {delay:.1f} s with {len(cached)} blocks cached")
        process.stderr.close()
    final = _start(tmp_path / "final", logs)
    _finish(final)
    context = f"VQ4DIT_FAULT_SEED={seed}: " + "; ".join(history)
    expected, resumed = _checkpoint(tmp_path / "whole"), _checkpoint(tmp_path / "final")
    assert resumed[0] == expected[0], context
    assert resumed[1] == expected[1], context


@pytest.mark.slow
def test_killed_runs_resume_to_the_uninterrupted_checkpoint(tmp_path):
    kill_and_resume(tmp_path, kills=2)


@pytest.mark.slow
def test_many_kills_resume_to_the_uninterrupted_checkpoint(tmp_path):
    kill_and_resume(tmp_path, kills=8)
