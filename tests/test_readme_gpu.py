"""Every command of the README's "Quantize DiT-XL/2 on a GPU", run on the CPU at small size: DiT-XL/2's 16 heads
and 1000 classes in the original checkpoint layout with two blocks of width 64 on a 4 x 4 latent, a small VAE,
the default pool (1000 trajectories, one per class), a stand-in for Inception. The commands are read from the
README: the dry runs print their estimate and write nothing, bf16 calibration runs, four devices become two CPU
processes whose checkpoint equals the one-device command's, and the quantized model is scored as the papers do."""

import json
import re
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from reference_dit import random_original_state_dict  # noqa: E402
from stand_in_inception import stand_in_features  # noqa: E402

from vq4dit.cli.estimate import estimate  # noqa: E402
from vq4dit.cli.evaluate import evaluate  # noqa: E402
from vq4dit.cli.quantize import quantize  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Quantize DiT-XL/2 on a GPU"
SIDE, PIXELS, HEADS, HEAD_DIM, SAMPLES = 4, 32, 16, 4, 40


def readme_commands() -> list[tuple[str, list[str]]]:
    text = (ROOT / "docs" / "imagenet-gpu.md").read_text()
    block = text[text.index(SECTION):].split("```bash\n", 1)[1].split("```", 1)[0]
    lines = block.replace("\\\n", " ").splitlines()
    commands = [shlex.split(line) for line in lines if re.match(r"python (train|eval)\.py ", line)]
    return [(words[1].removesuffix(".py"), words[2:]) for words in commands]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("gpu")
    state = random_original_state_dict(depth=2, hidden=HEADS * HEAD_DIM, heads=HEADS, patch=2, input_size=SIDE,
                                       in_ch=4, out_ch=8, num_classes=1000, seed=0)
    torch.save(state, tmp / "DiT-XL-2-256x256.pt")
    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, norm_num_groups=8,
                  latent_channels=4).save_pretrained(tmp / "sd-vae-ft-ema")
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (300, 3, PIXELS, PIXELS), dtype=np.uint8))
    pool, spatial, _ = (f.double().numpy() for f in stand_in_features()(images))
    np.savez(tmp / "reference.npz", arr_0=rng.integers(0, 256, (20, PIXELS, PIXELS, 3), dtype=np.uint8),
             mu=pool.mean(0), sigma=np.cov(pool, rowvar=False), mu_s=spatial.mean(0),
             sigma_s=np.cov(spatial, rowvar=False))
    (tmp / "unused-with-the-stand-in.pth").write_bytes(b"")  # paths must exist; the stand-in ignores it
    return {"/ckpt/DiT-XL-2-256x256.pt": str(tmp / "DiT-XL-2-256x256.pt"),
            "/ckpt/sd-vae-ft-ema": str(tmp / "sd-vae-ft-ema"),
            "/data/VIRTUAL_imagenet256_labeled.npz": str(tmp / "reference.npz"),
            "/ckpt/weights-inception-2015-12-05-6726825d.pth": str(tmp / "unused-with-the-stand-in.pth")}


def small(args: list[str], files: dict[str, str], ckpt: Path | None = None) -> list[str]:
    overrides = {k: files.get(v, v) for k, v in (a.split("=", 1) for a in args)}
    overrides.update({"device": "cpu", "model.arch.num_layers": "2", "model.arch.sample_size": str(SIDE),
                      "model.arch.attention_head_dim": str(HEAD_DIM), "sampler.steps": "3"})
    if "devices" in overrides:
        overrides["devices"] = "2"  # CPU processes
    if overrides.get("ckpt", "").startswith("logs/train/runs/"):
        overrides["ckpt"] = str(ckpt)
    if overrides.get("metric") == "imagenet":
        overrides.update({"num_samples": str(SAMPLES), "metric.sample_counts": "null", "metric.batch_size": "16",
                          "metric.feature_network": "{_target_: stand_in_inception.stand_in_features}"})
    else:
        overrides.update({"fit.iterations": "20", "log_samples": "0", "trainer.enable_progress_bar": "false"})
    return [f"{k}={v}" for k, v in overrides.items()]



@pytest.mark.slow
def test_every_gpu_command_runs_at_small_size(compose_cfg, files, tmp_path, one_thread):
    commands = readme_commands()
    assert [task for task, _ in commands] == ["train"] * 4 + ["eval"]
    assert all("model=dit_xl_2" in args and "device=cuda" in args for _, args in commands)
    dry, assumed, one, spread, score = commands

    for i, (_, args) in enumerate((dry, assumed)):  # what it costs; nothing is written
        cfg = compose_cfg("train", *small(args, files), f"paths.output_dir={tmp_path / f'dry{i}'}")
        assert cfg.dry_run and cfg.precision == "bf16"
        report = str(estimate(cfg))
        assert report.startswith("dry run: dit_xl_2 (2 blocks, 4 tokens x 64), vq4dit w2") and "total" in report
        assert ("assumed" in report) == (i == 1) and not (tmp_path / f"dry{i}").exists()

    ckpts = []
    # the README's one-device command as written; then, for the equality of 1 and 2 processes, the block loop
    # alone with fp student inputs (what several devices resolve to) and plain k-means starts (the data-aware
    # moments of a spread run were found to differ in the last bits: README, "Quantize DiT-XL/2 on a GPU")
    exact = ["model_fit=none", "method.kmeans_weighting=none"]
    for i, args in enumerate((one[1], [*one[1], "pool.student_inputs=fp", *exact], [*spread[1], *exact])):
        cfg = compose_cfg("train", *small(args, files), f"paths.output_dir={tmp_path / f'run{i}'}",
                          f"paths.log_dir={tmp_path / f'logs{i}'}")
        assert not cfg.dry_run and cfg.sampler.scheduler.variance_type == "learned_range"
        ckpts.append(quantize(cfg))
    manifests = [json.loads((c / "manifest.json").read_text()) for c in ckpts]
    assert manifests[0]["precision"] == "bf16" and manifests[0]["pool"]["trajectories"] == 1000
    assert [m["pool"]["student_inputs"] for m in manifests] == ["quantized", "fp", "fp"]
    a, b = (load_file(c / "model.safetensors") for c in ckpts[1:])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # 2 processes = 1

    cfg = compose_cfg("eval", *small(score[1], files, ckpt=ckpts[0]), f"paths.output_dir={tmp_path / 'eval'}")
    metrics = evaluate(cfg)
    assert {"fid", "sfid", "inception_score", "precision", "recall"} <= set(metrics)
    with np.load(tmp_path / "eval" / "samples.npz") as npz:
        assert npz["arr_0"].shape == (SAMPLES, PIXELS, PIXELS, 3) and npz["arr_0"].dtype == np.uint8
