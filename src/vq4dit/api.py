"""Quantize a DiT from Python, without Hydra (the entry points `train.py` / `eval.py` are thin callers of this):

    from diffusers import DiTTransformer2DModel
    from vq4dit.api import VQ4DiT, VQPreset, calibration_pool, load_quantized, quantize_model, save_quantized

    model = DiTTransformer2DModel.from_pretrained("/local/dit", subfolder="transformer")
    pool = calibration_pool(model, seed=0)                      # zero data: the model's own trajectories
    result = quantize_model(model, VQ4DiT(VQPreset(k=256, d=4)), pool, device="cuda")
    save_quantized(result, "dit-w2")                            # load_quantized("dit-w2") gives the model back

Any method (`RTN`, `GPTQ`, `KMeansVQ`, `ClassicVQ`, `VQ4DiT`, `QDiT`, `PTQ4DiT`) takes its preset (`VQPreset(k, d)`
or `UniformPreset(bits, group_size, symmetric)`), optionally activations (`act=ActPreset(bits=8)`, the method's
granularity unless given) and its settings as keyword arguments; every setting, its default and range is a field
of the method's class. `quantize_model` quantizes the model in place and leaves the pool as it found it, so one
pool serves several runs; its result carries the method, settings, fit, pool, seed and per-block records, and
`save_quantized` writes them into the checkpoint's manifest, as `train.py` does.
"""

import importlib
from pathlib import Path
from typing import TYPE_CHECKING

from diffusers import DDPMScheduler, DiTTransformer2DModel

from vq4dit.calibration.block_cache import BlockCache
from vq4dit.calibration.settings import PoolSettings
from vq4dit.calibration.zero_data import ZeroDataBlockInputs
from vq4dit.errors import UserError
from vq4dit.models import ConditionalDiT, load_dit
from vq4dit.quant.checkpoint import load_quantized
from vq4dit.quant.presets import ActPreset, UniformPreset, VQPreset
from vq4dit.sampling import Sampler

if TYPE_CHECKING:  # imported on first use (CALIBRATION, below); named here for readers and type checkers
    from vq4dit.calibration.pipeline import QuantizationResult, default_trainer, quantize_block, quantize_model
    from vq4dit.calibration.settings import ModelFitSettings
    from vq4dit.methods import GPTQ, RTN, ClassicVQ, FitSettings, KMeansVQ, Method, PTQ4DiT, QDiT, VQ4DiT

# The quantizing half needs the `calibrate` extra (Lightning, torchmetrics, ...) and is imported on first use, so
# that the runtime names above (load_quantized, Sampler, ...) work with the runtime dependencies alone.
CALIBRATION = {
    **dict.fromkeys(("QuantizationResult", "default_trainer", "quantize_block", "quantize_model"),
                    "vq4dit.calibration.pipeline"),
    "ModelFitSettings": "vq4dit.calibration.settings",
    **dict.fromkeys(("GPTQ", "RTN", "ClassicVQ", "FitSettings", "KMeansVQ", "Method", "PTQ4DiT", "QDiT", "VQ4DiT"),
                    "vq4dit.methods"),
}


class MissingExtraError(ModuleNotFoundError, UserError):
    """A calibration name asked for where the `calibrate` extra is not installed: an ImportError to Python's
    import machinery, a one-line UserError to the project's entry points."""


def __getattr__(name: str):
    module = CALIBRATION.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        value = getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as e:
        raise MissingExtraError(f"vq4dit.api.{name} needs the calibration tools and {e.name} is not installed; "
                                "valid: pip install 'vq4dit[calibrate]' (loading and sampling need none of them)",
                                name=e.name) from None
    globals()[name] = value
    return value


def calibration_pool(model: ConditionalDiT | DiTTransformer2DModel, sampler: Sampler | None = None, *, seed: int = 0,
                     progress: bool = True, **settings) -> ZeroDataBlockInputs:
    """The zero-data pool from `model`'s own sampling; default sampler: DDPM, 100 steps, guidance 1.5 (DiT's);
    `settings`: `PoolSettings`' fields (trajectories, size, heldout_trajectories, heldout_size), by default one
    trajectory per class (at least 64) and 2048 rows, labels balanced over the classes."""
    model = ConditionalDiT.of(model)
    if sampler is None:
        scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                                  clip_sample=False, variance_type="fixed_small")
        sampler = Sampler(scheduler, steps=100, guidance_scale=1.5, batch_size=250,
                          device=str(next(model.parameters()).device))
    return ZeroDataBlockInputs.of(model, sampler, PoolSettings(**settings), seed, progress=progress)


def save_quantized(result: "QuantizationResult", folder: str | Path) -> Path:
    """The checkpoint folder of `result`: its model and its record (`QuantizationResult.manifest`)."""
    return result.save(folder)


__all__ = ["ActPreset", "BlockCache", "ClassicVQ", "ConditionalDiT", "FitSettings", "GPTQ", "KMeansVQ", "Method",
           "ModelFitSettings", "PTQ4DiT", "PoolSettings", "QDiT", "QuantizationResult", "RTN", "Sampler",
           "UniformPreset", "VQ4DiT", "VQPreset", "ZeroDataBlockInputs", "calibration_pool", "default_trainer",
           "load_dit", "load_quantized", "quantize_block", "quantize_model", "save_quantized"]
