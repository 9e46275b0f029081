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
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from vq4dit.errors import UserError
from vq4dit.quant.act_quantizer import ActQuantizer
from vq4dit.quant.block_layers import INPUT_SITES
from vq4dit.quant.presets import FAMILIES, ActPreset, preset_record
from vq4dit.quant.quantized_linear import QuantizedLinear

if TYPE_CHECKING:
    from vq4dit.calibration.block_calibration import BlockCalibration
    from vq4dit.calibration.block_data import BlockData
    from vq4dit.calibration.zero_data import ZeroDataBlockInputs
    from vq4dit.models import ConditionalDiT


@dataclass(frozen=True)
class FitSettings:
    """How a fitting method's layers are trained on the block loss (the design card: batch 16, 500 iterations)."""

    iterations: int = 500
    batch_size: int = 16
    lr: float = 1e-4            # codebooks, scales and biases
    rmsprop_alpha: float = 0.9
    log_every: int = 10

    def __post_init__(self):
        for name in ("iterations", "batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise UserError(f"fit.{name}={getattr(self, name)}; valid: a positive integer")
        if not self.lr > 0:
            raise UserError(f"fit.lr={self.lr}; valid: a positive learning rate")
        if not 0 < self.rmsprop_alpha < 1:
            raise UserError(f"fit.rmsprop_alpha={self.rmsprop_alpha}; valid: a value in (0, 1)")


@dataclass
class RunContext:
    """What a model-level step (`Method.before_blocks`) may use besides the model."""

    pool: "ZeroDataBlockInputs"       # its `sampler` is the full-precision sampler of the run
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

    def __post_init__(self):
        expected = FAMILIES[self.family]
        if not isinstance(self.quant, expected):
            preset = getattr(self.quant, "name", "") or type(self.quant).__name__
            raise UserError(f"quant={preset} is a {getattr(self.quant, 'family', '?')} preset "
                            f"({self.quant.describe() if hasattr(self.quant, 'describe') else self.quant}); "
                            f"method={self.name} needs a {self.family} preset ({expected.__name__})")
        if not isinstance(self.act, ActPreset):
            raise UserError(f"act={self.act}; valid: an activation preset (configs/act/)")
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

    def transform_block(self, data: "BlockData") -> None:
        """Re-parameterize `data.block` (full precision) in place, keeping its outputs, before quantizing it."""

    def act_group_size(self, site: str, block: int) -> int | None:
        """Channels per activation range at `site` of block `block` (token_group granularity)."""
        return self.activation.group_size if self.activation.granularity == "token_group" else None

    def input_quantizers(self, linears: dict[str, nn.Linear], data: "BlockData") -> dict[str, ActQuantizer]:
        """Layer name -> the quantizer of its input ({} without activation quantization); the linears of a site
        share one; static ones are calibrated on the block's training rows."""
        from vq4dit.calibration.input_quantizers import build_input_quantizers

        if not self.activation.enabled:
            return {}
        groups = {site: self.act_group_size(site, data.index) for site in self.input_sites}
        return build_input_quantizers(self.activation, groups, linears, data)

    def start(self, linears: dict[str, nn.Linear], data: "BlockData") -> dict[str, QuantizedLinear]:
        raise NotImplementedError

    def prepare(self, linears: dict[str, nn.Linear], start: dict[str, QuantizedLinear],
                data: "BlockData") -> dict[str, nn.Module]:
        return start

    def finalize(self, layer: nn.Module) -> QuantizedLinear:
        return layer

    # -- fitting hooks (used when `fits`) ------------------------------------------------------------------
    def optimizer(self, layers: dict[str, nn.Module], fit: FitSettings) -> torch.optim.Optimizer:
        params = [p for layer in layers.values() for p in layer.parameters() if p.requires_grad]
        return torch.optim.RMSprop(params, lr=fit.lr, alpha=fit.rmsprop_alpha)

    def penalty(self, layers: dict[str, nn.Module], module: "BlockCalibration") -> torch.Tensor | None:
        """A term added to the loss (already weighted, e.g. a regulariser), or None."""
        return None

    def before_optimizer_step(self, layers: dict[str, nn.Module]) -> None:
        pass

    def after_step(self, layers: dict[str, nn.Module], module: "BlockCalibration") -> None:
        """After each optimizer step; `module.global_step` counts them, `module.heldout_mse()` scores the block."""

    def after_fit(self, layers: dict[str, nn.Module], module: "BlockCalibration") -> None:
        pass

    def curves(self, layers: dict[str, nn.Module]) -> dict[str, float]:
        """Extra TensorBoard scalars (calib/<name>) logged every `fit.log_every` steps."""
        return {}

    # -- records -------------------------------------------------------------------------------------------
    def record(self) -> dict:
        """The method and its settings as the manifest stores them (activations only when quantized)."""
        settings = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("quant", "act")}
        record = {"name": self.name, **settings, "quant": preset_record(self.quant)}
        if self.activation.enabled:
            record["act"] = {**preset_record(self.activation), "sites": list(self.input_sites)}
        return record
