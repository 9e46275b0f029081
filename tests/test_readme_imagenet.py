"""The README's DiT-XL/2 commands, run at small size: the DiT-XL/2 shape with two blocks on a 4 x 4 latent, a
small VAE, a reference batch of 32 px images and a stand-in for Inception (tests/stand_in_inception.py). The
commands are read from the README, so README and code cannot drift apart: all of them share one sampler, and the
full-precision eval writes an ADM-format samples.npz whose FID and sFID against the reference batch's stored
statistics equal the closed form computed here from that file."""

import re
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from scipy import linalg

sys.path.insert(0, str(Path(__file__).parent))
from reference_dit import random_original_state_dict  # noqa: E402
from stand_in_inception import stand_in_features  # noqa: E402

from vq4dit.cli.evaluate import evaluate  # noqa: E402
from vq4dit.errors import UserError, instantiate  # noqa: E402
from vq4dit.sampling import balanced_labels  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## DiT-XL/2 and the other ImageNet DiTs"
SIDE, PIXELS, SAMPLES = 4, 32, 40  # latent side, image side (VAE: 8x), samples (> the 28 spatial features)


def readme_commands() -> list[tuple[str, list[str]]]:
    """(task, overrides) of the `python train.py` / `python eval.py` lines of the section's first code block."""
    text = (ROOT / "docs" / "imagenet-gpu.md").read_text()
    block = text[text.index(SECTION):].split("```bash\n", 1)[1].split("```", 1)[0]
    lines = block.replace("\\\n", " ").splitlines()  # backslash continuations joined
    commands = [shlex.split(line) for line in lines if re.match(r"python (train|eval)\.py ", line)]
    return [(words[1].removesuffix(".py"), words[2:]) for words in commands]


def frechet(mu1, s1, mu2, s2) -> float:
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(linalg.sqrtm(s1 @ s2).real))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """The README's placeholder paths -> small local files of the same kind."""
    tmp = tmp_path_factory.mktemp("imagenet")
    state = random_original_state_dict(depth=2, hidden=1152, heads=16, patch=2, input_size=SIDE, in_ch=4, out_ch=8,
                                       num_classes=1000, seed=0)
    torch.save(state, tmp / "DiT-XL-2-256x256.pt")
    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, norm_num_groups=8,
                  latent_channels=4).save_pretrained(tmp / "sd-vae-ft-ema")
    rng = np.random.default_rng(0)
    net = stand_in_features()
    stats_images = torch.from_numpy(rng.integers(0, 256, (300, 3, PIXELS, PIXELS), dtype=np.uint8))
    pool, spatial, _ = (f.double().numpy() for f in net(stats_images))
    np.savez(tmp / "VIRTUAL_imagenet32.npz", arr_0=rng.integers(0, 256, (20, PIXELS, PIXELS, 3), dtype=np.uint8),
             mu=pool.mean(0), sigma=np.cov(pool, rowvar=False),
             mu_s=spatial.mean(0), sigma_s=np.cov(spatial, rowvar=False))
    (tmp / "unused-with-the-stand-in.pth").write_bytes(b"")  # paths must exist; the stand-in ignores it
    return {"/ckpt/DiT-XL-2-256x256.pt": str(tmp / "DiT-XL-2-256x256.pt"),
            "/ckpt/sd-vae-ft-ema": str(tmp / "sd-vae-ft-ema"),
            "/data/VIRTUAL_imagenet256_labeled.npz": str(tmp / "VIRTUAL_imagenet32.npz"),
            "/ckpt/weights-inception-2015-12-05-6726825d.pth": str(tmp / "unused-with-the-stand-in.pth"),
            "logs/train/runs/<timestamp>/checkpoint": str(tmp / "quantized-checkpoint-made-by-train")}


def small(args: list[str], files: dict[str, str]) -> list[str]:
    """The command's overrides with local files and small sizes (same keys replaced, new ones added)."""
    overrides = dict(a.split("=", 1) for a in args)
    overrides = {k: files.get(v, v) for k, v in overrides.items()}
    overrides.update({"device": "cpu", "model.arch.num_layers": "2", "model.arch.sample_size": str(SIDE),
                      "sampler.steps": "3", "sampler.batch_size": "16"})
    if overrides.get("metric") == "imagenet":
        overrides.update({"num_samples": str(SAMPLES), "metric.sample_counts": "null", "metric.batch_size": "16",
                          "metric.feature_network": "{_target_: stand_in_inception.stand_in_features}"})
    return [f"{k}={v}" for k, v in overrides.items()]


def test_train_and_eval_commands_share_one_sampler(compose_cfg, files):
    commands = readme_commands()
    assert [task for task, _ in commands] == ["eval", "train", "eval"]  # fp score, quantize, quantized score
    assert all("model=dit_xl_2" in args for _, args in commands)
    samplers = [compose_cfg(task, *small(args, files)).sampler for task, args in commands]
    # calibration trajectories and scored samples come from the same scheduler, variance type and steps
    for other in samplers[1:]:
        assert other.scheduler == samplers[0].scheduler and other.steps == samplers[0].steps
        assert other.guidance_scale == samplers[0].guidance_scale == 1.5
    assert samplers[0].scheduler.variance_type == "learned_range"


@pytest.mark.slow
def test_full_precision_eval_command_scores_like_the_adm_evaluator(compose_cfg, files, tmp_path):
    cfg = compose_cfg("eval", *small(readme_commands()[0][1], files))
    assert cfg.sampler.precision == "bf16" and cfg.metric.neighbours == 3 and cfg.metric.split_size == 5000
    metrics = evaluate(cfg)
    out = Path(cfg.paths.output_dir)
    assert {"fid", "sfid", "inception_score", "precision", "recall"} <= set(metrics)
    assert metrics["num_samples"] == SAMPLES and metrics["num_reference"] == 20 and "class_accuracy" not in metrics

    with np.load(out / "samples.npz") as npz:  # what the ADM evaluator reads
        assert sorted(npz.files) == ["arr_0", "arr_1"]
        images, labels = npz["arr_0"], npz["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (SAMPLES, PIXELS, PIXELS, 3)
    assert np.array_equal(labels, balanced_labels(SAMPLES, 1000).numpy()) and len(np.unique(images)) > 100
    pool, spatial, _ = (f.double().numpy() for f in stand_in_features()(torch.from_numpy(images).permute(0, 3, 1, 2)))
    with np.load(files["/data/VIRTUAL_imagenet256_labeled.npz"]) as ref:
        fid = frechet(pool.mean(0), np.cov(pool, rowvar=False), ref["mu"], ref["sigma"])
        sfid = frechet(spatial.mean(0), np.cov(spatial, rowvar=False), ref["mu_s"], ref["sigma_s"])
    assert metrics["fid"] == pytest.approx(fid, rel=1e-5) and metrics["sfid"] == pytest.approx(sfid, rel=1e-5)

    # the protocol's sample counts are the default: the same command at 40 samples stops before sampling
    strict = compose_cfg("eval", *small(readme_commands()[0][1], files), "metric.sample_counts=[10000,50000]",
                         f"paths.output_dir={tmp_path / 'strict'}")
    with pytest.raises(UserError, match="num_samples=40"):
        evaluate(strict)
    assert not (tmp_path / "strict").exists()


def test_eval_refuses_a_reference_batch_without_statistics(compose_cfg, files, tmp_path):
    with np.load(files["/data/VIRTUAL_imagenet256_labeled.npz"]) as ref:
        np.savez(tmp_path / "images_only.npz", arr_0=ref["arr_0"])
    args = small(readme_commands()[0][1], files) + [f"metric.reference={tmp_path / 'images_only.npz'}"]
    with pytest.raises(UserError, match="holds no mu/sigma/mu_s/sigma_s"):
        instantiate(compose_cfg("eval", *args).metric)
