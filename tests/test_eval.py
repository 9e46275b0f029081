"""`evaluate(cfg)` end to end on a random digits-architecture DiT: what it writes, that a seed reproduces it, PSNR
against an earlier run's samples, that it never overwrites, and the `python eval.py` command line (exit 0 / exit 2
with one `error:` line)."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image

from vq4dit.cli.evaluate import evaluate, load_model, sample_and_score
from vq4dit.errors import UserError
from vq4dit.models.dit import build_transformer

ROOT = Path(__file__).resolve().parents[1]
LAYERS = 2
SMALL = ["num_samples=40", "sampler.steps=4", "sampler.batch_size=20", f"model.arch.num_layers={LAYERS}"]
METRICS = {"fid", "fid_floor", "inception_score", "class_accuracy"}


@pytest.fixture(scope="module")
def random_dit(tmp_path_factory) -> Path:
    """A random DiT with the dit_digits architecture (fewer layers), saved as a diffusers folder."""
    arch = OmegaConf.to_container(OmegaConf.load(ROOT / "configs/model/dit_digits.yaml").arch)
    arch["num_layers"] = LAYERS
    folder = tmp_path_factory.mktemp("model") / "random_dit"
    build_transformer(arch, seed=1).save_pretrained(folder)
    return folder


def _compose(out: Path, *overrides: str):
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        return compose("eval", overrides=[f"paths.output_dir={out / 'run'}", f"paths.log_dir={out / 'logs'}",
                                          *overrides])


@pytest.fixture(scope="module")
def first_run(random_dit, tmp_path_factory):
    """(cfg, returned metrics) of one evaluation into a fresh folder, shared by the tests below."""
    cfg = _compose(tmp_path_factory.mktemp("eval"), f"ckpt={random_dit}", *SMALL)
    return cfg, evaluate(cfg)


def test_writes_metrics_grid_and_events(first_run, random_dit):
    cfg, metrics = first_run
    out = Path(cfg.paths.output_dir)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == metrics
    assert set(saved) >= METRICS and all(isinstance(saved[k], float) for k in METRICS)
    assert saved["ckpt"] == str(random_dit) and saved["model"] == "dit_digits" and saved["num_samples"] == 40
    assert saved["fid"] > 0 and saved["fid_floor"] > 0 and 1 <= saved["inception_score"] <= 10
    assert 0 <= saved["class_accuracy"] <= 1

    grid = Image.open(out / "samples.png")
    cell = (16 + 2) * cfg.grid_upscale  # a 16 px sample in a 1 px grey frame
    assert grid.mode == "L" and grid.size == (cfg.grid_columns * cell, 10 * cell)  # a row per class
    # 40 balanced samples: 4 per class row, the other columns black samples in grey frames
    pixels = set(grid.crop((4 * cell, 0, grid.width, grid.height)).getdata())
    assert pixels == {0, 128}

    with np.load(out / "samples.npz") as npz:  # every sample, 8-bit, in the ADM evaluator's layout
        assert npz["arr_0"].dtype == np.uint8 and npz["arr_0"].shape == (40, 16, 16, 1)
        assert npz["arr_1"].tolist() == [i % 10 for i in range(40)]

    events = list(out.rglob("events.out.tfevents.*"))
    assert events and all(e.is_relative_to(out) for e in events)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0].parent)).Reload()
    assert {f"eval/{k}" for k in METRICS} <= set(acc.Tags()["scalars"])
    assert acc.Scalars("eval/fid")[0].value == pytest.approx(metrics["fid"], rel=1e-6)
    assert "eval/samples" in acc.Tags()["images"]


def test_same_seed_into_a_fresh_folder_gives_the_same_numbers(first_run, random_dit, tmp_path):
    _, metrics = first_run
    again = evaluate(_compose(tmp_path, f"ckpt={random_dit}", *SMALL))
    assert again == metrics


def test_psnr_against_an_earlier_runs_samples(first_run, random_dit, tmp_path):
    cfg, _ = first_run
    earlier = Path(cfg.paths.output_dir) / "samples.npz"
    same = evaluate(_compose(tmp_path / "same", f"ckpt={random_dit}", *SMALL, f"compare_to={earlier}"))
    assert same["psnr_vs_reference"] == math.inf  # same seed, same noise: the same 8-bit samples
    other = _compose(tmp_path / "other", f"ckpt={random_dit}", *SMALL, "seed=1", f"compare_to={earlier}")
    value = evaluate(other)["psnr_vs_reference"]
    with np.load(earlier) as a, np.load(Path(other.paths.output_dir) / "samples.npz") as b:
        mse = ((a["arr_0"].astype(np.float64) - b["arr_0"]) ** 2).mean()
    assert value == pytest.approx(10 * math.log10(255 ** 2 / mse), abs=1e-3) and value < 40
    fewer = _compose(tmp_path / "fewer", f"ckpt={random_dit}", *SMALL, "num_samples=20", f"compare_to={earlier}")
    with pytest.raises(UserError, match="compare_to=.*same num_samples"):
        evaluate(fewer)
    assert not (tmp_path / "fewer" / "run").exists()


def test_psnr_against_samples_in_memory(random_dit, tmp_path):
    """The benchmarks' way: all samples come back as floats, and float samples are compared as they are."""
    cfg = _compose(tmp_path, f"ckpt={random_dit}", *SMALL)
    model = load_model(cfg.model, cfg.ckpt)
    images, labels, _ = sample_and_score(cfg, model)
    assert images.shape == (40, 1, 16, 16) and labels.tolist() == [i % 10 for i in range(40)]
    noisy = images + 0.01 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
    _, _, metrics = sample_and_score(cfg, model, compare_to=noisy)
    mse = (images.double() - noisy.double()).pow(2).mean().item()
    assert metrics["psnr_vs_reference"] == pytest.approx(10 * math.log10(4 / mse), abs=1e-3)
    with pytest.raises(UserError, match="compare_to holds samples of shape"):
        sample_and_score(cfg, model, compare_to=noisy[:20])


def test_never_overwrites_an_earlier_run(first_run):
    cfg, _ = first_run
    metrics_file = Path(cfg.paths.output_dir) / "metrics.json"
    before = metrics_file.read_bytes(), (metrics_file.parent / "samples.png").read_bytes()
    with pytest.raises(UserError, match="already exists"):
        evaluate(cfg)
    assert (metrics_file.read_bytes(), (metrics_file.parent / "samples.png").read_bytes()) == before
    assert not list(metrics_file.parent.glob("*.tmp*"))


def test_missing_checkpoint_is_a_user_error_naming_it(compose_cfg, tmp_path):
    missing = tmp_path / "no_such_model"
    cfg = compose_cfg("eval", f"ckpt={missing}", *SMALL)
    with pytest.raises(UserError, match=re.escape(str(missing))):
        evaluate(cfg)
    assert not (tmp_path / "run").exists()  # failed before writing anything


def _eval_py(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PROJECT_ROOT": str(ROOT)}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, "eval.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_command_line_evaluates(random_dit, tmp_path):
    result = _eval_py(f"ckpt={random_dit}", f"model.arch.num_layers={LAYERS}", "num_samples=20", "sampler.steps=2",
                      f"paths.log_dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    fid = re.search(r"^fid: (\S+)$", result.stdout, re.M)
    assert fid and float(fid.group(1)) > 0, result.stdout
    runs = list((tmp_path / "eval" / "runs").iterdir())  # Hydra's run folder under paths.log_dir
    assert len(runs) == 1 and (runs[0] / "metrics.json").exists() and (runs[0] / "samples.png").exists()
    saved = json.loads((runs[0] / "metrics.json").read_text())
    assert saved["num_samples"] == 20 and float(fid.group(1)) == pytest.approx(saved["fid"], abs=1e-4)


def test_speed_is_printed_and_written(first_run):
    cfg, _ = first_run
    speed = json.loads((Path(cfg.paths.output_dir) / "speed.json").read_text())
    seconds, rates = speed["seconds"], speed["samples_per_s"]
    assert speed["num_samples"] == 40 and speed["threads"] == torch.get_num_threads()
    assert set(seconds) == {"loading", "sampling", "scoring", "writing", "total"} and min(seconds.values()) > 0
    assert seconds["total"] == pytest.approx(sum(v for k, v in seconds.items() if k != "total"), abs=0.01)
    for phase in ("sampling", "scoring"):
        assert rates[phase] == pytest.approx(40 / seconds[phase], rel=0.01)
    (reference,) = speed["reference_features"]  # computed on this first run, into the run's log folder's cache
    assert reference["name"] == "digits-real-features" and reference["source"].startswith("computed, cached in")
    entry = Path(reference["source"].removeprefix("computed, cached in "))
    assert entry.parent == Path(cfg.paths.log_dir) / "eval" / "cache" and entry.is_file()
    assert 0 < reference["seconds"] <= seconds["scoring"]


@pytest.mark.slow
def test_command_line_reuses_the_reference_cache_with_the_numbers_of_an_uncached_run(random_dit, tmp_path, capsys):
    """Two runs of `python eval.py` into one log folder: the first computes the real images' features and caches
    them, the second loads them; a run with reference_cache=false computes them again; the same numbers each time."""
    small = [f"ckpt={random_dit}", f"model.arch.num_layers={LAYERS}", "num_samples=20", "sampler.steps=2"]
    runs = {}
    for name in ("cold", "warm"):
        result = _eval_py(*small, f"paths.log_dir={tmp_path / 'logs'}", f"hydra.run.dir={tmp_path / name}")
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = result.stdout, json.loads((tmp_path / name / "metrics.json").read_text())
    off = evaluate(_compose(tmp_path / "off", *small, "reference_cache=false"))  # in-process: one start-up less
    runs["off"] = capsys.readouterr().out, off
    scoring = {name: re.search(r"^scoring: (\S+) samples/s \(.*digits-real-features (.*) in \S+ s\)$", out, re.M)
               for name, (out, _) in runs.items()}
    assert all(scoring.values()), runs
    assert scoring["cold"].group(2).startswith("computed, cached in ")
    assert scoring["warm"].group(2) == "loaded from " + scoring["cold"].group(2).removeprefix("computed, cached in ")
    assert scoring["off"].group(2) == "computed (reference_cache=false)"
    assert re.search(r"^sampling: \S+ samples/s \(", runs["warm"][0], re.M)
    assert runs["cold"][1] == runs["warm"][1] == runs["off"][1]
    assert len(list((tmp_path / "logs" / "eval" / "cache").iterdir())) == 1
    assert not (tmp_path / "off" / "logs" / "eval" / "cache").exists()  # nothing stored with the cache off


def test_command_line_bad_checkpoint_exits_2_with_one_line(tmp_path):
    result = _eval_py("ckpt=/nonexistent", f"paths.log_dir={tmp_path}")
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "/nonexistent" in lines[0], result.stderr
    assert "Traceback" not in result.stderr + result.stdout
