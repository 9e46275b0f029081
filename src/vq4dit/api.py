"""Quantize a DiT from Python, without Hydra (the entry points `train.py` / `eval.py` are thin callers of this):

    from diffusers import DiTTransformer2DModel
    from vq4dit.api import ConditionalDiT, VQ4DiT, VQPreset, calibration_pool, quantize_model, save_quantized

    model = DiTTransformer2DModel.from_pretrained("/local/dit", subfolder="transformer")
    pool = calibration_pool(model, seed=0)                      # zero data: the model's own trajectories
    result = quantize_model(model, VQ4DiT(VQPreset(k=256, d=4)), pool, device="cuda")
    save_quantized(result.model, "dit-w2")                      # load_quantized("dit-w2") gives it back

Any method (`RTN`, `GPTQ`, `KMeansVQ`, `ClassicVQ`, `VQ4DiT`, `QDiT`, `PTQ4DiT`) takes its preset (`VQPreset(k, d)`
or `UniformPreset(bits, group_size, symmetric)`), optionally activations (`act=ActPreset(bits=8)`, the method's
granularity unless given) and its settings as keyword arguments.
"""

from diffusers import DDPMScheduler, DiTTransformer2DModel

from vq4dit.calibration.block_cache import BlockCache
from vq4dit.calibration.pipeline import QuantizationResult, default_trainer, quantize_block, quantize_model
from vq4dit.calibration.zero_data import ZeroDataBlockInputs
from vq4dit.methods import GPTQ, PTQ4DiT, RTN, ClassicVQ, FitSettings, KMeansVQ, Method, QDiT, VQ4DiT
from vq4dit.models import ConditionalDiT, load_dit
from vq4dit.quant.checkpoint import load_quantized, save_quantized
from vq4dit.quant.presets import ActPreset, UniformPreset, VQPreset
from vq4dit.sampling import Sampler


def calibration_pool(model: ConditionalDiT | DiTTransformer2DModel, sampler: Sampler | None = None,
                     trajectories: int | None = None, size: int = 2048, heldout_trajectories: int = 8,
                     heldout_size: int = 256, seed: int = 0, progress: bool = True) -> ZeroDataBlockInputs:
    """The zero-data pool from `model`'s own sampling; default sampler: DDPM, 100 steps, guidance 1.5 (DiT's);
    default trajectories: one per class, at least 64, labels balanced over the classes."""
    model = ConditionalDiT.of(model)
    if sampler is None:
        scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                                  clip_sample=False, variance_type="fixed_small")
        sampler = Sampler(scheduler, steps=100, guidance_scale=1.5, batch_size=250,
                          device=str(next(model.parameters()).device))
    return ZeroDataBlockInputs(model, sampler, trajectories, size, seed, heldout_trajectories, heldout_size,
                               progress=progress)


__all__ = ["ActPreset", "BlockCache", "ClassicVQ", "ConditionalDiT", "FitSettings", "GPTQ", "KMeansVQ", "Method",
           "PTQ4DiT", "QDiT", "QuantizationResult", "RTN", "Sampler", "UniformPreset", "VQ4DiT", "VQPreset",
           "ZeroDataBlockInputs", "calibration_pool", "default_trainer", "load_dit", "load_quantized", "quantize_block",
           "quantize_model", "save_quantized"]
