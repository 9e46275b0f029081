"""The method seam: what the block loop asks of a quantization method.

Once, before the block loop, `before_blocks(model, run)`: a model-level step on the full-precision model (Q-DiT's
group-size search); nothing by default.

For every block the pipeline calls, in this order and without knowing which method it runs:

0. `transform_block(data)` - an output-preserving re-parameterization of the full-precision block before its
   linears are quantized (PTQ4DiT folds its salience balancing into adaLN and v); nothing by default. Then
   `input_quantizers(linears, data)` - the activation quantizers of the layers whose inputs the method quantizes
   (`act`, at `input_sites`), static ones calibrated on the block's training rows; they ride on the start, the
   prepared layers (so a fit sees quantized activations) and the deployed layers.
1. `start(linears, data)` - the data-free starting point as deployed layers (k-means VQ, round-to-nearest).
   Fitting methods normalise their loss by its block error, and the pipeline never ships a block that is worse
   than it on held-out rows.
2. `prepare(linears, start, data)` - the layers the method works on: a trainable calibration state (soft VQ),
   layers computed from the block's inputs (GPTQ), or simply the start.
3. if `fits`: a Lightning fit of those layers with the block-output loss (`BlockCalibration`), which calls the
   hooks below (`optimizer`, `penalty`, `before_optimizer_step`, `after_step`, `curves`).
4. `finalize(layer)` - the deployed `QuantizedLinear` that is saved.

A method is one module and one config (`configs/method/<name>.yaml`, whose `_target_` is the class); it names
the preset family it accepts, and `check` refuses presets and models it cannot apply to before any work.
"""

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from torch import nn

from vq4dit.errors import UserError
from vq4dit.methods.block_data import BlockData
from vq4dit.methods.input_quantizers import build_input_quantizers

if TYPE_CHECKING:  # (importing the model's code would import diffusers into every command's preflight)
    from vq4dit.models import ConditionalDiT
from vq4dit.quant.act_quantizer import ActQuantizer, input_quantizer_of
from vq4dit.quant.block_layers import INPUT_SITES
from vq4dit.quant.presets import FAMILIES, ActPreset, preset_record
from vq4dit.quant.quantized_linear import QuantizedLinear
from vq4dit.settings import check_settings, setting, setting_fields


@dataclass(frozen=True)
class FitSettings:
    """How a fitting method's layers are trained on the block loss (the design card: batch 16, 500 iterations):
    one Lightning Trainer.fit per block, batches drawn from the pool's training rows. Methods that do not fit
    ignore it."""

    iterations: int = setting(500, low=1)
    batch_size: int = setting(16, low=1)
    lr: float = setting(1e-4, low=0, low_open=True)   # codebooks, scales and biases (VQ4DiT's logits: lr_ratios)
    rmsprop_alpha: float = setting(0.9, low=0, high=1, low_open=True, high_open=True)
    log_every: int = setting(10, low=1)               # TensorBoard curves every this many steps

    def __post_init__(self):
        check_settings(self, "fit")


class FitState(Protocol):
    """What the fitting hooks see of the running fit (calibration.block_calibration.BlockCalibration)."""

    global_step: int              # optimizer steps taken so far
    fit_settings: FitSettings
    stats: dict                   # the block's statistics, which the method may add to

    def heldout_mse(self) -> float: ...


@dataclass
class RunContext:
    """What a model-level step (`Method.before_blocks`) may use besides the model."""

    pool: Any                         # the calibration pool (ZeroDataBlockInputs); its `sampler` is the run's fp one
    device: torch.device
    seed: int
    logger: Any = None                # a Lightning logger (TensorBoard curves), or None
    work_dir: Path | None = None      # kept across an interrupted run of the same config (resume state)
    output_dir: Path | None = None    # this run's folder (results a user may reuse)
    scorer: Callable[[], Any] | None = None   # builds the configured sample scorer (FID), if the run has one
    progress: bool = True


@dataclass
class Method:
    quant: object                  # the weight preset (every subclass narrows its type)
    act: ActPreset = field(default_factory=ActPreset)  # activations (act=none: full precision)
    name: ClassVar[str]
    object_fields: ClassVar[tuple[str, ...]] = ("quant", "act")  # objects, not settings (settings.py)
    family: ClassVar[str]          # the preset family this method accepts ("vq" or "uniform")
    fits: ClassVar[bool] = False   # whether prepared layers are trained on the block loss
    seeded: ClassVar[bool] = True  # whether the result depends on the seed (its pool, its k-means start)
    # where and how the method quantizes activations when `act` has bits (an act preset's open settings)
    input_sites: ClassVar[tuple[str, ...]] = ("qkv", "proj", "fc1", "fc2")
    act_defaults: ClassVar[dict] = {"granularity": "tensor", "dynamic": False}
    # what a block's student sees when pool.student_inputs is null: the fp blocks' outputs ("fp") or its quantized
    # predecessor's ("quantized")
    student_inputs: ClassVar[str] = "fp"
    # model-level fit steps after the blocks when model_fit.iterations is null (calibration/model_fit.py)
    model_fit_iterations: ClassVar[int] = 0
    # whether the method chooses each layer's group size itself (Q-DiT's search), not the preset
    per_layer_group_sizes: ClassVar[bool] = False

    def __post_init__(self):
        expected = FAMILIES[self.family]
        if not isinstance(self.quant, expected):
            preset = getattr(self.quant, "name", "") or type(self.quant).__name__
            raise UserError(f"quant={preset} is a {getattr(self.quant, 'family', '?')} preset "
                            f"({self.quant.describe() if hasattr(self.quant, 'describe') else self.quant}); "
                            f"method={self.name} needs a {self.family} preset ({expected.__name__})")
        if not isinstance(self.act, ActPreset):
            raise UserError(f"act={self.act}; valid: an activation preset (configs/act/)")
        check_settings(self, "method")
        self.activation = self.act.resolved(self.act_defaults)  # the act preset as this method applies it

    # -- the block loop ------------------------------------------------------------------------------------
    def check(self, linears: dict[str, nn.Linear]) -> None:
        """Raise a one-line UserError if the method or its presets cannot be applied to these layers."""
        self.quant.check(linears)
        if self.activation.enabled:
            for site in self.input_sites:
                width = linears[INPUT_SITES[site][0]].in_features
                group = self.act_group_size(site, 0)
                if self.activation.granularity == "token_group" and group is None:
                    raise UserError("act.granularity=token_group needs act.group_size; valid: a divisor of the "
                                    f"input width {width} of {site}")
                if group is not None and width % group:
                    raise UserError(f"act.group_size={group} does not divide the input width {width} of {site}")

    # -- model-level and per-block steps around the weights ---------------------------------------------------
    def before_blocks(self, model: "ConditionalDiT", run: RunContext) -> None:
        """Once, on the full-precision model, before the block loop."""

    def transform_block(self, data: BlockData) -> None:
        """Re-parameterize `data.block` (full precision) in place, keeping its outputs, before quantizing it."""

    def act_group_size(self, site: str, block: int) -> int | None:
        """Channels per activation range at `site` of block `block` (token_group granularity)."""
        return self.activation.group_size if self.activation.granularity == "token_group" else None

    def input_quantizers(self, linears: dict[str, nn.Linear], data: BlockData) -> dict[str, ActQuantizer]:
        """Layer name -> the quantizer of its input ({} without activation quantization); the linears of a site
        share one; static ones are calibrated on the block's training rows."""

        if not self.activation.enabled:
            return {}
        groups = {site: self.act_group_size(site, data.index) for site in self.input_sites}
        return build_input_quantizers(self.activation, groups, linears, data)

    def start(self, linears: dict[str, nn.Linear], data: BlockData) -> dict[str, QuantizedLinear]:
        raise NotImplementedError

    def prepare(self, linears: dict[str, nn.Linear], start: dict[str, QuantizedLinear],
                data: BlockData) -> dict[str, nn.Module]:
        return start

    def finalize(self, layer: nn.Module) -> QuantizedLinear:
        return layer

    # -- fitting hooks (used when `fits`) ------------------------------------------------------------------
    def optimizer(self, layers: dict[str, nn.Module], fit: FitSettings) -> torch.optim.Optimizer:
        params = [p for layer in layers.values() for p in layer.parameters() if p.requires_grad]
        return torch.optim.RMSprop(params, lr=fit.lr, alpha=fit.rmsprop_alpha)

    def penalty(self, layers: dict[str, nn.Module], module: FitState) -> torch.Tensor | None:
        """A term added to the loss (already weighted, e.g. a regulariser), or None."""
        return None

    def before_optimizer_step(self, layers: dict[str, nn.Module]) -> None:
        pass

    def after_step(self, layers: dict[str, nn.Module], module: FitState) -> None:
        """After each optimizer step; `module.global_step` counts them, `module.heldout_mse()` scores the block."""

    def after_fit(self, layers: dict[str, nn.Module], module: FitState) -> None:
        pass

    def curves(self, layers: dict[str, nn.Module]) -> dict[str, float]:
        """Extra TensorBoard scalars (calib/<name>) logged every `fit.log_every` steps."""
        return {}

    # -- what it deploys ------------------------------------------------------------------------------------
    def deployed_fields(self) -> dict:
        """What every layer this method deploys has: the layer type of its preset family (vq: `VQLinear`,
        uniform: `UniformLinear`) and the preset's values."""
        q = self.quant
        if self.family == "vq":
            return {"layer_type": "vq", "k": q.k, "d": q.d}
        fields = {"layer_type": "uniform", "bits": q.bits, "symmetric": q.symmetric}
        return fields if self.per_layer_group_sizes else {**fields, "group_size": q.group_size}

    def check_deployed(self, layers: dict[str, nn.Module]) -> None:
        """Raise a one-line ValueError naming the first layer this method would not deploy (a cached block of
        another method or preset): another layer type or preset value, an input quantizer it does not use."""
        want = self.deployed_fields()
        acting = {n for site in self.input_sites for n in INPUT_SITES[site]} if self.activation.enabled else set()
        for name, layer in layers.items():
            have = {key: getattr(layer, key, None) for key in want}
            if have != want:
                key = next(k for k in want if have[k] != want[k])
                raise ValueError(f"layer {name} has {key}={have[key]}; method={self.name} with "
                                 f"quant={self.quant.name or self.quant.values_name()} deploys {key}={want[key]}")
            quantizer = input_quantizer_of(layer)
            bits = None if quantizer is None else quantizer.bits
            expected = self.activation.bits if name in acting else None
            if bits != expected:
                said = lambda b: "full precision" if b is None else f"{b} bits"  # noqa: E731
                raise ValueError(f"layer {name} takes its input in {said(bits)}; method={self.name} with "
                                 f"act={self.act.name or self.activation.values_name()} gives it {said(expected)}")

    # -- records -------------------------------------------------------------------------------------------
    def record(self) -> dict:
        """The method and its settings as the manifest stores them (activations only when quantized)."""
        settings = {f.name: _plain(getattr(self, f.name)) for f in setting_fields(type(self))}
        record = {"name": self.name, **settings, "quant": preset_record(self.quant)}
        if self.activation.enabled:
            record["act"] = {**preset_record(self.activation), "sites": list(self.input_sites)}
        return record


def _plain(value):
    """A setting as JSON stores it (a nested settings dataclass as a mapping)."""
    return asdict(value) if is_dataclass(value) else value
