"""Every DiT of facebookresearch/DiT's `DiT_models` table is a config, and each size family goes the whole way:
a checkpoint in the original layout (built here at the family's real width and heads, on a small input) loads
through the config, matches the independent oracle of the original forward, samples with the learned-sigma preset
and decodes through a VAE from a local folder; the same weights as a diffusers pipeline folder sample the same."""

import shutil
import sys
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from hydra.utils import instantiate
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).parent))
from reference_dit import ReferenceDiT, random_original_state_dict  # noqa: E402

from vq4dit.errors import UserError  # noqa: E402
from vq4dit.models.dit import load_vae  # noqa: E402
from vq4dit.sampling import balanced_labels  # noqa: E402

# models.py: DiT_XL (depth 28, hidden 1152, 16 heads), DiT_L (24, 1024, 16), DiT_B (12, 768, 12), DiT_S (12, 384, 6)
ORIGINAL = {"xl": (28, 1152, 16), "l": (24, 1024, 16), "b": (12, 768, 12), "s": (12, 384, 6)}
CONFIGS = {f"dit_{size}_{patch}": (size, patch, 256) for size in ORIGINAL for patch in (2, 4, 8)}
CONFIGS["dit_xl_2_512"] = ("xl", 2, 512)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_is_the_original_models_table(compose_cfg, name):
    size, patch, pixels = CONFIGS[name]
    model = compose_cfg("train", f"model={name}").model  # (eval.py's model takes its weights from ckpt)
    arch, (depth, hidden, heads) = model.arch, ORIGINAL[size]
    assert model.name == name
    assert (arch.num_layers, arch.num_attention_heads * arch.attention_head_dim, arch.num_attention_heads) == \
        (depth, hidden, heads)
    assert (arch.patch_size, arch.sample_size * 8) == (patch, pixels)
    assert (arch.in_channels, arch.out_channels, arch.num_embeds_ada_norm) == (4, 8, 1000)  # learned sigma
    # the original's numerics (see models/dit.py) and the SD VAE's latent scale
    assert (arch.norm_eps, model.timestep_shift, model.guided_channels, model.latent_scale) == (1e-6, 0, 3, 0.18215)
    assert OmegaConf.is_missing(model, "weights") and OmegaConf.is_missing(model, "vae")


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory) -> Path:
    """A small random AutoencoderKL with the SD VAE's interface (3 -> 4 latent channels, 8x downsampling)."""
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=1, norm_num_groups=8)
    folder = tmp_path_factory.mktemp("vae") / "sd-vae-ft-ema"
    vae.save_pretrained(folder)
    return folder


# one family per size, the patch sizes spread over them; S/2 keeps its full depth (12: block ids of two digits),
# the others keep two blocks of their real width so the test stays fast
FAMILIES = {"dit_s_2": None, "dit_b_4": 2, "dit_l_8": 2, "dit_xl_2": 2}


@pytest.mark.parametrize("name", FAMILIES)
def test_original_checkpoint_loads_and_samples(compose_cfg, vae_folder, tmp_path, name):
    size, patch, _ = CONFIGS[name]
    depth, hidden, heads = ORIGINAL[size]
    depth = FAMILIES[name] or depth
    side = 2 * patch if patch > 2 else 8  # latent side: 4 to 16 tokens
    state = random_original_state_dict(depth=depth, hidden=hidden, heads=heads, patch=patch, input_size=side,
                                       in_ch=4, out_ch=8, num_classes=1000, seed=1)
    torch.save(state, tmp_path / "DiT.pt")
    small = [f"model.arch.num_layers={depth}", f"model.arch.sample_size={side}", "sampler=ddpm_learned_sigma",
             "sampler.steps=2", "sampler.batch_size=3", f"model.vae={vae_folder}", "ckpt=x"]
    cfg = compose_cfg("eval", f"model={name}", f"model.weights={tmp_path / 'DiT.pt'}", *small)
    model = instantiate(cfg.model)
    assert len(model.blocks) == depth and model.image_shape == (3, 8 * side, 8 * side)

    g = torch.Generator().manual_seed(2)
    x, t, y = torch.randn(3, 4, side, side, generator=g), torch.tensor([999, 500, 3]), torch.tensor([0, 999, 1000])
    with torch.no_grad():
        ours = model(x, t, y)
    ref = ReferenceDiT(state, hidden=hidden, heads=heads, patch=patch, input_size=side, in_channels=4,
                       out_channels=8)(x, t, y)
    assert ours.shape == (3, 8, side, side)
    assert ((ours.double() - ref.double()).norm() / ref.double().norm()).item() < 1e-4

    sampler, labels = instantiate(cfg.sampler), balanced_labels(3, model.num_classes)
    images = sampler.sample(model, labels, seed=0, progress=False)
    assert images.shape == (3, 3, 8 * side, 8 * side) and torch.isfinite(images).all() and images.abs().max() <= 1

    # the same weights as a diffusers pipeline folder (transformer/ and vae/, like facebook/DiT-XL-2-256)
    pipeline = tmp_path / "pipeline"
    model.transformer.save_pretrained(pipeline / "transformer")
    shutil.copytree(vae_folder, pipeline / "vae")
    cfg = compose_cfg("eval", f"model={name}", f"model.weights={pipeline}", *small, f"model.vae={pipeline}")
    again = instantiate(cfg.model)
    assert torch.equal(sampler.sample(again, labels, seed=0, progress=False), images)


def test_vae_folder_without_a_config_is_refused(tmp_path):
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    with pytest.raises(UserError) as err:
        load_vae(tmp_path)
    assert str(tmp_path) in str(err.value) and "config.json" in str(err.value) and "\n" not in str(err.value)


LARGEST = ("dit_l_8", "dit_xl_2")  # slow to quantize here (CI runs them too)


@pytest.mark.parametrize("name", [pytest.param(n, marks=[pytest.mark.slow] if n in LARGEST else []) for n in FAMILIES])
def test_original_checkpoint_quantizes_saves_reloads_and_samples(compose_cfg, vae_folder, tmp_path, monkeypatch,
                                                                name):
    """load (original layout) -> quantize (train.py's job, RTN 4-bit groups of 64: every family's widths divide)
    -> save -> load (eval.py's loader, from the manifest) -> sample through the VAE, for each size family."""
    from vq4dit.cli.evaluate import load_model
    from vq4dit.cli.quantize import quantize
    from vq4dit.quant.checkpoint import save_quantized

    size, patch, _ = CONFIGS[name]
    depth, hidden, heads = ORIGINAL[size]
    depth = FAMILIES[name] or depth
    side = 2 * patch if patch > 2 else 8
    state = random_original_state_dict(depth=depth, hidden=hidden, heads=heads, patch=patch, input_size=side,
                                       in_ch=4, out_ch=8, num_classes=1000, seed=1)
    torch.save(state, tmp_path / "DiT.pt")
    small = [f"model={name}", f"model.arch.num_layers={depth}", f"model.arch.sample_size={side}",
             "sampler.steps=2", "sampler.batch_size=3", f"model.vae={vae_folder}"]
    train = compose_cfg("train", *small, f"model.weights={tmp_path / 'DiT.pt'}", "method=rtn", "quant=w4g64",
                        "pool.trajectories=4", "pool.size=16", "pool.heldout_trajectories=2", "pool.heldout_size=8",
                        "log_samples=0")
    made = []
    monkeypatch.setattr("vq4dit.calibration.pipeline.save_checkpoint",
                        lambda model, *args: made.append(model) or save_quantized(model, *args))
    ckpt = quantize(train)
    fp = instantiate(train.model)
    cfg = compose_cfg("eval", *small, f"ckpt={ckpt}")
    model = load_model(cfg.model, cfg.ckpt)
    assert len(model.blocks) == depth and model.image_shape == (3, 8 * side, 8 * side)

    g = torch.Generator().manual_seed(2)
    x, t, y = torch.randn(3, 4, side, side, generator=g), torch.tensor([999, 500, 3]), torch.tensor([0, 999, 1000])
    with torch.no_grad():
        ours, in_memory, reference = model(x, t, y), made[0](x, t, y), fp(x, t, y)
    torch.testing.assert_close(ours, in_memory, rtol=1e-5, atol=1e-5)  # what was saved is what was quantized
    error = ((ours - reference).norm() / reference.norm()).item()
    assert 0 < error < 0.3  # 4-bit weights (random ones, through up to 12 blocks): near the original, not equal

    sampler, labels = instantiate(cfg.sampler), balanced_labels(3, model.num_classes)
    images = sampler.sample(model, labels, seed=0, progress=False)
    assert images.shape == (3, 3, 8 * side, 8 * side) and torch.isfinite(images).all() and images.abs().max() <= 1
