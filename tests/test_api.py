"""The Python API without Hydra: a plain diffusers DiT in, a quantized model out, saved and loaded back."""

import torch
from diffusers import DDPMScheduler

from vq4dit.api import (GPTQ, FitSettings, Sampler, UniformPreset, VQ4DiT, VQPreset, calibration_pool, load_quantized,
                        quantize_model, save_quantized)
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
        result = quantize_model(model, method, _pool(model), fit=FitSettings(iterations=5), progress=False)
        assert len(result.blocks) == 2 and len(quantized_layers(result.model)) == 14
        folder = save_quantized(result.model, tmp_path / name)
        loaded = load_quantized(folder)  # the architecture comes from the manifest
        with torch.no_grad():
            ours, again = result.model(x, t, y), loaded(x, t, y)
        assert torch.equal(ours, again)
        results[name] = (ours - fp).square().mean().item() / fp.square().mean().item()
    assert all(0 < r < 0.5 for r in results.values()), results  # close to the fp model, but quantized
