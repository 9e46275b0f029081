"""The Python API without Hydra: a plain diffusers DiT in, a quantized model out, saved with its record and
loaded back; the pool is left as it was found, so one pool serves several runs."""

import json

import pytest
import torch
from diffusers import DDPMScheduler

from vq4dit.api import (
    GPTQ,
    FitSettings,
    ModelFitSettings,
    Sampler,
    UniformPreset,
    VQ4DiT,
    VQPreset,
    calibration_pool,
    load_quantized,
    quantize_model,
    save_quantized,
)
from vq4dit.errors import UserError
from vq4dit.models.dit import build_transformer
from vq4dit.quant.checkpoint import quantized_layers

ARCH = dict(num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
            patch_size=2, num_embeds_ada_norm=10, norm_eps=1e-6)


def _pool(transformer):
    sampler = Sampler(DDPMScheduler(beta_schedule="linear", clip_sample=False), steps=4, guidance_scale=1.5,
                      batch_size=8)
    return calibration_pool(transformer, sampler, trajectories=4, size=32, heldout_trajectories=2, heldout_size=8,
                            progress=False)


def test_quantize_save_load_without_hydra(tmp_path):
    transformer = build_transformer(ARCH, seed=3).eval()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([5, 700]), torch.tensor([3, 10])
    with torch.no_grad():
        fp = transformer(x, timestep=t, class_labels=y).sample
    results = {}
    for name, method in {"gptq": GPTQ(UniformPreset(bits=4, group_size=32)),
                         "vq4dit": VQ4DiT(VQPreset(k=16, d=2), kmeans_iters=5)}.items():
        model = build_transformer(ARCH, seed=3).eval()
        result = quantize_model(model, method, _pool(model), fit=FitSettings(iterations=5),
                                model_fit=ModelFitSettings(iterations=20), progress=False)
        assert len(result.blocks) == 2 and len(quantized_layers(result.model)) == 14
        folder = save_quantized(result, tmp_path / name)
        loaded = load_quantized(folder)  # the architecture comes from the manifest
        with torch.no_grad():
            ours, again = result.model(x, t, y), loaded(x, t, y)
        assert torch.equal(ours, again)
        results[name] = (ours - fp).square().mean().item() / fp.square().mean().item()
        manifest = json.loads((folder / "manifest.json").read_text())  # the run's record, read back from disk
        assert manifest["method"]["name"] == name and manifest["seed"] == 0
        assert manifest["fit"] == ({**vars(FitSettings(iterations=5))} if method.fits else None)
        assert [b["block"] for b in manifest["blocks"]] == [0, 1]
        assert manifest["pool"]["size"] == 32 and manifest["pool"]["trajectories"] == 4
        assert manifest["sampler"]["steps"] == 4 and manifest["sampler"]["scheduler"]["class"] == "DDPMScheduler"
    assert all(0 < r < 0.5 for r in results.values()), results  # close to the fp model, but quantized


def test_a_pool_serves_a_second_run_unchanged():
    """Two runs from one pool give the same model as two runs from two fresh pools (the pool's rows are never
    advanced by a run: once they were, and a second run calibrated block 0 on block 5's outputs)."""
    fp = build_transformer(ARCH, seed=3).eval()
    pool = _pool(fp)
    before = pool.hidden.clone()
    method = VQ4DiT(VQPreset(k=16, d=2), kmeans_iters=3)
    settings = dict(fit=FitSettings(iterations=3), model_fit=ModelFitSettings(iterations=2), progress=False)
    first = quantize_model(build_transformer(ARCH, seed=3).eval(), method, pool, **settings)
    assert torch.equal(pool.hidden, before)
    second = quantize_model(build_transformer(ARCH, seed=3).eval(), method, pool, **settings)
    fresh = quantize_model(build_transformer(ARCH, seed=3).eval(), method, _pool(fp), **settings)
    assert second.blocks == first.blocks == fresh.blocks
    for a, b in zip(second.model.state_dict().values(), fresh.model.state_dict().values()):
        assert torch.equal(a, b)


def test_settings_are_checked_by_the_class_with_one_line():
    with pytest.raises(UserError, match=r"^method\.candidates=0; valid: an integer >= 1$"):
        VQ4DiT(VQPreset(k=16, d=2), candidates=0)
    with pytest.raises(UserError, match=r"^method\.ratio_init=soft; valid: uniform, inverse_distance$"):
        VQ4DiT(VQPreset(k=16, d=2), ratio_init="soft")
    with pytest.raises(UserError, match=r"^fit\.lr=0; valid: a number > 0$"):
        FitSettings(lr=0)
    with pytest.raises(UserError, match=r"^method\.candidates=17; valid: 1\.\.k \(16\)$"):  # a relation
        VQ4DiT(VQPreset(k=16, d=2), candidates=17)
