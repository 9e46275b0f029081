"""One preflight sees the final config whatever the entry: output locations, export's arguments, Hydra's launch
flags (a sweep, --cfg), closed sets of strings and related values; benchmarks/compare.py checks its arguments
before any work. Each case: exit 2, one line naming the value, nothing left behind."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from vq4dit.deploy.synthetic import random_quantized_dit
from vq4dit.errors import UserError
from vq4dit.methods.qdit import read_group_sizes
from vq4dit.models.dit import build_transformer
from vq4dit.quant.block_layers import block_linears
from vq4dit.quant.checkpoint import save_quantized
from vq4dit.quant.presets import VQPreset

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model=dit_tiny", "fit.iterations=2", "pool.trajectories=2", "pool.size=16", "pool.heldout_trajectories=1",
        "pool.heldout_size=4", "sampler.steps=2", "log_samples=0", "trainer.enable_progress_bar=false",
        "model_fit=none"]
TINY_ARCH = {"num_attention_heads": 2, "attention_head_dim": 32, "in_channels": 4, "out_channels": 8,
             "num_layers": 2, "sample_size": 8, "patch_size": 2, "num_embeds_ada_norm": 10, "norm_eps": 1e-6}


def cli(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PROJECT_ROOT": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, script, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def assert_refused(result: subprocess.CompletedProcess, *named: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    assert all(text in lines[0] for text in named), (named, lines[0])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_quantized(random_quantized_dit(TINY_ARCH, VQPreset(16, 2), name="dit_tiny"),
                          tmp_path_factory.mktemp("ckpt") / "checkpoint")


@pytest.mark.parametrize("overrides,named", [
    (["sampler.scheduler.variance_type=learned_rangee"], ["variance_type=learned_rangee", "learned_range"]),
    (["sampler.scheduler.beta_schedule=cosine"], ["beta_schedule=cosine", "squaredcos_cap_v2"]),
    (["model=dit_tiny", "model.guided_channels=9"], ["guided_channels=9", "4 input channels"]),
    (["devices=999"], ["devices=999", "cores"]),
    (["fit.lr=0", "--cfg", "job"], ["fit.lr=0"]),  # printing the config checks it first
    (["-m", "method=rtn,vq4dit", "quant=w3"], ["method=rtn", "uniform preset"]),  # every sweep job, first
], ids=["variance_type", "beta_schedule", "guided_channels", "devices", "cfg-job", "sweep"])
def test_train_refuses_in_one_line(tmp_path, overrides, named):
    flags = [o for o in overrides if o == "-m"]  # Hydra takes its flags before the overrides
    result = cli("train.py", *flags, *TINY[:1], *(o for o in overrides if o != "-m"), f"paths.log_dir={tmp_path}")
    assert_refused(result, *named)
    assert not [p for p in tmp_path.rglob("*") if p.is_file()], "a refused command left files"


def test_an_output_folder_given_directly_is_the_one_checked(tmp_path, checkpoint):
    """paths.output_dir=... is where the job writes: checked there (results kept, writability), not elsewhere."""
    run = tmp_path / "run"
    (run / "checkpoint").mkdir(parents=True)
    (run / "checkpoint" / "manifest.json").write_text("{}")
    before = sorted(p.name for p in run.rglob("*"))
    assert_refused(cli("train.py", *TINY, f"paths.output_dir={run}"), str(run / "checkpoint"), "never overwritten")
    assert sorted(p.name for p in run.rglob("*")) == before
    blocked = tmp_path / "a_file"
    blocked.write_text("")
    assert_refused(cli("eval.py", f"ckpt={checkpoint}", "model=dit_tiny", f"paths.output_dir={blocked / 'run'}"),
                   str(blocked / "run"))


def test_export_checks_its_folder_before_any_work(tmp_path, checkpoint):
    taken = tmp_path / "taken"
    taken.mkdir()
    assert_refused(cli("export.py", f"ckpt={checkpoint}", f"out={taken}", f"paths.log_dir={tmp_path}"),
                   f"out={taken}", "already exists")
    blocked = tmp_path / "a_file"
    blocked.write_text("")
    assert_refused(cli("export.py", f"ckpt={checkpoint}", f"out={blocked / 'x'}", f"paths.log_dir={tmp_path}"),
                   "cannot be written", "out")
    assert not (blocked.parent / "x").exists()


@pytest.mark.parametrize("record,named", [
    ({"group_sizes": [{"qkv": 0, "proj": 32, "fc1": 32, "fc2": 32}] * 2}, ["group size 0"]),
    ({"group_sizes": [{"qkv": 32}] * 2}, ["group size None"]),
    ({"group_sizes": {"qkv": 32}}, ["one mapping per block"]),
    ({"group_sizes": [{"qkv": 32, "proj": 32, "fc1": 32, "fc2": 32}]}, ["one mapping per block"]),
    ({"hidden": None}, ["lacks hidden"]),
], ids=["zero", "missing-site", "not-a-list", "too-few-blocks", "missing-key"])
def test_malformed_group_size_files_are_one_line(tmp_path, record, named):
    good = {"format": "qdit-group-sizes", "model": "dit_tiny", "hidden": 64, "blocks": 2,
            "group_sizes": [{"qkv": 32, "proj": 32, "fc1": 32, "fc2": 32}] * 2}
    bad = {**good, **record}
    bad = {k: v for k, v in bad.items() if v is not None}
    (tmp_path / "sizes.json").write_text(json.dumps(bad))
    linears = block_linears(build_transformer(TINY_ARCH).transformer_blocks[0])
    assert read_group_sizes(str(_written(tmp_path / "good.json", good)), 64, linears, 2) == good["group_sizes"]
    with pytest.raises(UserError) as e:
        read_group_sizes(str(tmp_path / "sizes.json"), 64, linears, 2)
    assert all(text in str(e.value) for text in named) and "\n" not in str(e.value)


def _written(path: Path, record: dict) -> Path:
    path.write_text(json.dumps(record))
    return path


@pytest.mark.parametrize("args,named", [  # one in the default run; each is a 20 s subprocess
    (["--seeds", "0,x"], ["--seeds 0,x"]),
    pytest.param(["--num-samples", "0"], ["--num-samples 0"], marks=pytest.mark.slow),
    pytest.param(["--rows", "nomethod-w3"], ["nomethod-w3"], marks=pytest.mark.slow),
    pytest.param(["--rows", "vq4dit-w4g64"], ["vq4dit-w4g64", "needs a vq preset"], marks=pytest.mark.slow),
], ids=["seeds", "num-samples", "unknown-row", "wrong-family"])
def test_compare_checks_its_arguments_before_any_work(tmp_path, args, named):
    result = cli("benchmarks/compare.py", *args, "--out", str(tmp_path / "out"))
    assert_refused(result, *named)
    assert not (tmp_path / "out").exists()


def test_files_are_written_as_the_umask_allows(tmp_path, checkpoint):
    """safetensors writes owner-only files; ours take the umask like any file (here 022: readable by all)."""
    for path in (checkpoint / "model.safetensors", checkpoint / "manifest.json"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~_umask(), path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_header_that_claims_a_huge_tensor_is_refused_before_allocating(tmp_path, checkpoint):
    """A safetensors header whose entry claims 1 TB (shape and offsets) is one line, not an allocation error."""
    import shutil
    import struct

    from vq4dit.quant.checkpoint import load_quantized

    copy = tmp_path / "checkpoint"
    shutil.copytree(checkpoint, copy)
    raw = (copy / "model.safetensors").read_bytes()
    length = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + length])
    name = next(k for k in header if k != "__metadata__")
    header[name] = {"dtype": "U8", "shape": [2**40], "data_offsets": [0, 2**40]}
    text = json.dumps(header).encode()
    (copy / "model.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + length:])
    with pytest.raises(UserError, match=rf"tensor {name} claims bytes 0\.\.{2**40}") as e:
        load_quantized(copy)
    assert "\n" not in str(e.value)


def test_eval_refuses_model_settings_the_checkpoint_was_not_calibrated_with(tmp_path, checkpoint):
    """timestep_shift (and guided channels, latent scale) change what the model computes: the command may not
    silently differ from the checkpoint (once, samples came out 37 dB apart)."""
    assert_refused(cli("eval.py", f"ckpt={checkpoint}", "model=dit_tiny", "model.timestep_shift=1",
                       "num_samples=20", "sampler.steps=2", f"paths.log_dir={tmp_path}"),
                   "model.timestep_shift=0", "model.timestep_shift=1")
