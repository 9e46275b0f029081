"""ConditionalDiTPipeline: the digits DiT (10 classes, null label 10, pixel space: no VAE), quantized and exported
by export.py with pipeline=true, loads with `from_pretrained` and samples the project Sampler's images from the
same noise, which the shipped digit classifier recognises; a latent DiT with a VAE and the original DiT's
3-channel guidance does the same; bad labels and a latent model without its VAE are refused in one line."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler

from vq4dit.cli.export import export
from vq4dit.deploy.pipeline import ConditionalDiTPipeline, export_pipeline
from vq4dit.errors import UserError
from vq4dit.metrics import load_classifier
from vq4dit.models import ConditionalDiT, load_dit
from vq4dit.models.dit import build_transformer
from vq4dit.quant.block_layers import QUANTIZED_LINEARS, replace_layer
from vq4dit.quant.checkpoint import load_quantized, save_quantized
from vq4dit.quant.uniform_linear import UniformLinear
from vq4dit.sampling import Sampler

ROOT = Path(__file__).resolve().parents[1]
CLASSIFIER = ROOT / "data" / "digit_classifier.safetensors"
TINY = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
            patch_size=2, num_embeds_ada_norm=10, norm_eps=1e-6)


def digits_model() -> ConditionalDiT:
    """The shipped digits DiT, built from its model config as train.py and eval.py build it."""
    spec = yaml.safe_load((ROOT / "configs" / "model" / "dit_digits.yaml").read_text())
    return load_dit(spec["name"], spec["arch"], weights=str(ROOT / "data" / "dit_digits"),
                    timestep_shift=spec["timestep_shift"], guided_channels=spec["guided_channels"],
                    latent_scale=spec["latent_scale"])


def ddim() -> DDIMScheduler:  # configs/sampler/ddim.yaml: deterministic steps, so the start noise is all the noise
    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                         clip_sample=False)


def quiet(pipe: ConditionalDiTPipeline) -> ConditionalDiTPipeline:
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def rtn_digits(tmp_path_factory) -> Path:
    """The digits DiT with every block linear rounded to 4 bits (RTN, groups of 64): a quantized checkpoint made
    in a second, without calibration."""
    model = digits_model()
    for block in model.blocks:
        for name in QUANTIZED_LINEARS:
            replace_layer(block, name, UniformLinear.from_linear(block.get_submodule(name), 4, 64, False))
    return save_quantized(model, tmp_path_factory.mktemp("rtn") / "checkpoint")


def test_the_digits_export_samples_the_project_samplers_images(rtn_digits, compose_cfg, tmp_path):
    folder = export(compose_cfg("export", f"ckpt={rtn_digits}", f"out={tmp_path / 'pipe'}", "pipeline=true"))
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "ConditionalDiTPipeline" and index["vae"] == [None, None]
    assert (index["guidance_scale"], index["num_inference_steps"]) == (2.0, 100)  # configs/sampler/ddpm.yaml
    pipe = quiet(ConditionalDiTPipeline.from_pretrained(folder))
    assert isinstance(pipe.scheduler, DDPMScheduler) and pipe.vae is None
    assert any(isinstance(m, UniformLinear) for m in pipe.transformer.modules())  # the quantized transformer
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    labels = list(range(10))
    images = pipe(labels, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="pt").images
    sampler = Sampler(ddim(), steps=4, guidance_scale=2.0, batch_size=10)
    ours = sampler.sample(load_quantized(rtn_digits), torch.tensor(labels), seed=0, progress=False)
    assert images.shape == (10, 1, 16, 16)
    assert torch.equal(images, ours / 2 + 0.5)  # the same images, so the same accuracy as the project's sampler
    predicted = load_classifier(CLASSIFIER)(images * 2 - 1).argmax(1)
    assert (predicted == torch.tensor(labels)).float().mean() >= 0.8


def test_ddpm_draws_its_step_noise_from_the_generator(tmp_path):
    pipe = quiet(ConditionalDiTPipeline.from_pretrained(
        export_pipeline(digits_model(), tmp_path / "fp", DDPMScheduler(beta_schedule="linear", clip_sample=False),
                        guidance_scale=2.0, num_inference_steps=3)))
    run = lambda seed: pipe([1, 7], generator=torch.Generator().manual_seed(seed), output_type="np").images
    first = run(0)
    assert first.shape == (2, 16, 16, 1) and (first >= 0).all() and (first <= 1).all()
    assert (run(0) == first).all() and not (run(1) == first).all()
    image = pipe([4], num_inference_steps=1).images[0]  # the default output: PIL, one channel
    assert image.mode == "L" and image.size == (16, 16)


def test_a_latent_dit_decodes_with_its_vae_and_guides_its_first_channels(tmp_path):
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=4, layers_per_block=1).eval()
    model = ConditionalDiT(build_transformer(TINY, seed=1).eval(), "dit_tiny", guided_channels=3, vae=vae,
                           latent_scale=0.5).eval()
    folder = export_pipeline(model, tmp_path / "latent", ddim(), guidance_scale=3.0, num_inference_steps=3)
    pipe = quiet(ConditionalDiTPipeline.from_pretrained(folder))
    assert isinstance(pipe.vae, AutoencoderKL) and pipe.config.guided_channels == 3
    images = pipe([0, 9, 5], generator=torch.Generator().manual_seed(2), output_type="pt").images
    ours = Sampler(ddim(), steps=3, guidance_scale=3.0, batch_size=3).sample(model, torch.tensor([0, 9, 5]), seed=2,
                                                                            progress=False)
    assert images.shape == (3, 3, 16, 16) and torch.equal(images, ours / 2 + 0.5)


def test_bad_labels_and_a_latent_model_without_its_vae_are_refused(tmp_path):
    model = ConditionalDiT(build_transformer(TINY, seed=1).eval(), "dit_tiny", latent_scale=0.18215).eval()
    with pytest.raises(UserError, match=r"latent_scale=0.18215 \(it decodes with a VAE\).*pipeline=false") as err:
        export_pipeline(model, tmp_path / "latent", ddim())
    assert "\n" not in str(err.value) and not (tmp_path / "latent").exists()
    pipe = quiet(ConditionalDiTPipeline(model.transformer, ddim(), latent_scale=0.18215, num_inference_steps=1))
    for labels, bad in (([3, 10], "10"), ([-1], "-1"), ([2.5], "2.5"), ([], "\\[\\]")):
        with pytest.raises(UserError, match=rf"class_labels={bad}; valid: one or more integers 0 to 9 ") as err:
            pipe(labels)
        assert "\n" not in str(err.value)
    with pytest.raises(UserError, match=r"no VAE but latent_scale=0.18215.*vae=AutoencoderKL"):
        pipe([3])
    pixel = ConditionalDiT(model.transformer, "dit_tiny")
    (tmp_path / "taken").mkdir()
    with pytest.raises(UserError, match="taken already exists"):
        export_pipeline(pixel, tmp_path / "taken", ddim())
