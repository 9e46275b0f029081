"""diffusers-native: a quantized tiny DiT (VQ and scalar) exported with export.py loads with the plain
`DiTTransformer2DModel.from_pretrained` in a fresh interpreter and computes what the project's own loader
computes; an exported full-precision DiT converted from the original reproduces the original forward (its
timestep shift travels in the config); `DiTPipeline` generates from it; bad input is one line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from reference_dit import ReferenceDiT, random_original_state_dict  # noqa: E402

import vq4dit  # noqa: E402,F401  (registers the backend)
from vq4dit.api import RTN, KMeansVQ, Sampler, UniformPreset, VQPreset, calibration_pool, quantize_model  # noqa: E402
from vq4dit.cli.export import export  # noqa: E402
from vq4dit.deploy import diffusers_quantizer  # noqa: E402
from vq4dit.deploy.export import export_diffusers  # noqa: E402
from vq4dit.deploy.synthetic import random_quantized_dit  # noqa: E402
from vq4dit.errors import UserError  # noqa: E402
from vq4dit.models import load_dit  # noqa: E402
from vq4dit.models.dit import build_transformer  # noqa: E402
from vq4dit.quant.checkpoint import load_quantized, save_quantized  # noqa: E402
from vq4dit.quant.quantized_linear import QuantizedLinear  # noqa: E402

TINY = dict(num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
            patch_size=2, num_embeds_ada_norm=10, norm_eps=1e-6)
FRESH_LOAD = (  # a new interpreter that knows nothing but `import vq4dit` and diffusers' public API
    "import sys, torch\n"
    "{first}\n{second}\n"
    "inp = torch.load(sys.argv[1], weights_only=True)\n"
    "outs = {{}}\n"
    "for path in sys.argv[3:]:\n"
    "    model = DiTTransformer2DModel.from_pretrained(path)\n"
    "    kinds = sorted({{type(m).__name__ for m in model.modules() if 'Linear' in type(m).__name__}})\n"
    "    with torch.no_grad():\n"
    "        outs[path] = (model(inp['x'], timestep=inp['t'], class_labels=inp['y']).sample, kinds)\n"
    "torch.save(outs, sys.argv[2])\n"
)


def tied_tiny(seed: int = 3) -> DiTTransformer2DModel:
    """A tiny random DiT whose blocks share one embedder, as the original's do."""
    transformer = build_transformer(TINY, seed=seed).eval()
    for block in transformer.transformer_blocks[1:]:
        block.norm1.emb.load_state_dict(transformer.transformer_blocks[0].norm1.emb.state_dict())
    return transformer


def fresh_outputs(tmp_path: Path, folders: list[Path], inputs: dict, vq4dit_first: bool = True) -> dict:
    torch.save(inputs, tmp_path / "inputs.pt")
    lines = ["import vq4dit", "from diffusers import DiTTransformer2DModel"]
    script = FRESH_LOAD.format(first=lines[0 if vq4dit_first else 1], second=lines[1 if vq4dit_first else 0])
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt"),
                             *map(str, folders)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(tmp_path / "out.pt", weights_only=True)


@pytest.fixture(scope="module")
def quantized_checkpoints(tmp_path_factory):
    """The tiny DiT quantized by k-means VQ and by RTN on its own zero-data pool, saved as project checkpoints."""
    out = {}
    for name, method in {"kmeans": KMeansVQ(VQPreset(k=16, d=2)),
                         "rtn": RTN(UniformPreset(bits=3, group_size=32))}.items():
        model = tied_tiny()
        sampler = Sampler(DDIMScheduler(beta_schedule="linear", clip_sample=False), steps=4, guidance_scale=1.5,
                          batch_size=8)
        pool = calibration_pool(model, sampler, trajectories=4, size=32, heldout_trajectories=2, heldout_size=8,
                                progress=False)
        result = quantize_model(model, method, pool, progress=False)
        out[name] = save_quantized(result.model, tmp_path_factory.mktemp(name) / "checkpoint")
    return out


@pytest.mark.slow
def test_plain_from_pretrained_in_a_fresh_interpreter_equals_the_project_loader(quantized_checkpoints, compose_cfg,
                                                                                 tmp_path):
    folders = []
    for name, ckpt in quantized_checkpoints.items():
        cfg = compose_cfg("export", f"ckpt={ckpt}", f"out={tmp_path / name}")
        folders.append(export(cfg))
    config = json.loads((folders[0] / "config.json").read_text())
    assert (config["_class_name"] == "DiTTransformer2DModel"
            and config["quantization_config"]["quant_method"] == "vq4dit")
    assert config["quantization_config"]["timestep_shift"] == 0  # the original DiT's, which diffusers does not build
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([10, 500, 999]), torch.tensor([1, 2, 10])
    for order in (True, False):  # `import vq4dit` before and after diffusers
        outs = fresh_outputs(tmp_path, folders, {"x": x, "t": t, "y": y}, vq4dit_first=order)
        for (name, ckpt), folder in zip(quantized_checkpoints.items(), folders):
            with torch.no_grad():
                ours = load_quantized(ckpt)(x, t, y)
            theirs, kinds = outs[str(folder)]
            assert torch.equal(theirs, ours), name
            assert kinds == sorted([{"kmeans": "VQLinear", "rtn": "UniformLinear"}[name], "Linear"])


def test_an_exported_fp_dit_reproduces_the_original_forward(tmp_path):
    """Original-format weights -> load_dit (timestep shift 0) -> export -> plain diffusers in a new process:
    the same outputs as an independent implementation of the original DiT; diffusers' own shift would not be."""
    state = random_original_state_dict(depth=2, hidden=64, heads=2, patch=2, input_size=8, in_ch=4, out_ch=8,
                                       num_classes=10, seed=0)
    torch.save(state, tmp_path / "original.pt")
    model = load_dit("dit_tiny", TINY, weights=str(tmp_path / "original.pt"), timestep_shift=0)
    folder = export_diffusers(model, tmp_path / "fp")
    assert json.loads((folder / "config.json").read_text())["quantization_config"]["layers"] == {}
    g = torch.Generator().manual_seed(1)
    x, t, y = torch.randn(4, 4, 8, 8, generator=g), torch.tensor([0, 17, 500, 999]), torch.tensor([0, 3, 9, 10])
    theirs, kinds = fresh_outputs(tmp_path, [folder], {"x": x, "t": t, "y": y})[str(folder)]
    oracle = ReferenceDiT(state, hidden=64, heads=2, patch=2, input_size=8, in_channels=4, out_channels=8)
    expected = oracle(x, t, y)
    rel = lambda a, b: ((a.double() - b.double()).norm() / b.double().norm()).item()  # noqa: E731
    assert rel(theirs, expected) < 1e-4 and kinds == ["Linear"]
    plain = build_transformer(TINY, timestep_shift=1)  # what diffusers builds from the same config
    plain.load_state_dict(model.transformer.state_dict())
    with torch.no_grad():
        assert rel(plain(x, timestep=t, class_labels=y).sample, expected) > 1e-3


def test_a_model_with_diffusers_own_shift_exports_as_a_plain_folder(tmp_path):
    model = load_dit("dit_tiny", TINY, timestep_shift=1)
    folder = export_diffusers(model, tmp_path / "plain")
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())


def test_dit_pipeline_generates_with_the_exported_transformer(tmp_path):
    """diffusers' DiTPipeline (ImageNet's null label 1000, so a 1000-class model) with the exported quantized
    transformer and a small VAE: the same images as the pipeline built on the project loader's transformer."""
    arch = {**TINY, "num_embeds_ada_norm": 1000}
    ckpt = save_quantized(random_quantized_dit(arch, VQPreset(16, 2), name="dit_1000"), tmp_path / "ckpt")
    folder = export_diffusers(load_quantized(ckpt), tmp_path / "export")
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=4, layers_per_block=1).eval()
    images = {}
    for name, transformer in {"diffusers": DiTTransformer2DModel.from_pretrained(folder),
                              "project": load_quantized(ckpt).transformer}.items():
        pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler())
        pipe.set_progress_bar_config(disable=True)
        images[name] = pipe(class_labels=[3, 999], num_inference_steps=3, guidance_scale=1.5,
                            generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert images["diffusers"].shape == (2, 3, 16, 16) and torch.isfinite(images["diffusers"]).all()
    assert torch.equal(images["diffusers"], images["project"])


def test_dequantize_gives_dense_layers_and_save_pretrained_round_trips(quantized_checkpoints, tmp_path):
    folder = export_diffusers(load_quantized(quantized_checkpoints["kmeans"]), tmp_path / "export")
    model = DiTTransformer2DModel.from_pretrained(folder)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.tensor([1, 10])
    with torch.no_grad():
        expected = model(x, timestep=t, class_labels=y).sample
    if diffusers_quantizer.SAVE_HOOK:
        model.save_pretrained(tmp_path / "again")
        again = DiTTransformer2DModel.from_pretrained(tmp_path / "again")
        with torch.no_grad():
            assert torch.equal(again(x, timestep=t, class_labels=y).sample, expected)
    model.dequantize()
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())
    assert isinstance(model.transformer_blocks[0].attn1.to_q, nn.Linear)
    with torch.no_grad():
        torch.testing.assert_close(model(x, timestep=t, class_labels=y).sample, expected, rtol=1e-5, atol=1e-5)


def test_export_refuses_an_existing_folder_and_a_bad_decode_mode(quantized_checkpoints, compose_cfg, tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(UserError, match="taken already exists"):
        export(compose_cfg("export", f"ckpt={quantized_checkpoints['rtn']}", f"out={tmp_path / 'taken'}"))
    with pytest.raises(UserError, match="decode=lazy; valid: per_forward, once") as err:
        export(compose_cfg("export", f"ckpt={quantized_checkpoints['rtn']}", f"out={tmp_path / 'x'}", "decode=lazy"))
    assert "\n" not in str(err.value) and not (tmp_path / "x").exists()


def test_export_refuses_a_checkpoint_with_activation_quantizers(tmp_path):
    from vq4dit.quant.presets import ActPreset

    model = tied_tiny()
    sampler = Sampler(DDIMScheduler(beta_schedule="linear", clip_sample=False), steps=4, guidance_scale=1.5,
                      batch_size=8)
    pool = calibration_pool(model, sampler, trajectories=4, size=32, heldout_trajectories=2, heldout_size=8,
                            progress=False)
    result = quantize_model(model, RTN(UniformPreset(bits=4), ActPreset(bits=8)), pool, progress=False)
    ckpt = save_quantized(result.model, tmp_path / "checkpoint")
    with pytest.raises(UserError, match="quantizes activations at transformer_blocks.0.*act=none") as err:
        export_diffusers(load_quantized(ckpt), tmp_path / "out")
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()


def test_an_untested_diffusers_version_is_refused_with_the_tested_range(quantized_checkpoints, tmp_path, monkeypatch):
    folder = export_diffusers(load_quantized(quantized_checkpoints["kmeans"]), tmp_path / "export")
    monkeypatch.setattr("diffusers.__version__", "0.99.0")
    with pytest.raises(UserError, match=r"diffusers 0.99.0 is not one vq4dit's loader is tested with \(>=0.33,<0.43\)"):
        DiTTransformer2DModel.from_pretrained(folder)


def test_importing_vq4dit_imports_neither_torch_nor_diffusers():
    code = "import sys, vq4dit; print(sorted(m for m in ('torch', 'diffusers') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stderr[-2000:]


@pytest.mark.parametrize("first", ["import vq4dit", "from vq4dit.deploy.export import export_diffusers",
                                   "from vq4dit.deploy.diffusers_quantizer import VQ4DiTConfig",
                                   "import diffusers.quantizers; import vq4dit"])
def test_the_backend_is_registered_whatever_is_imported_first(first):
    code = f"{first}\nfrom diffusers.quantizers import auto\nprint(auto.AUTO_QUANTIZER_MAPPING['vq4dit'].__name__)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "VQ4DiTQuantizer", result.stderr[-2000:]
