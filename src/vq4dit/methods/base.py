"""The method seam: what the block loop asks of a quantization method.

For every block the pipeline calls, in this order and without knowing which method it runs:

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

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from vq4dit.errors import UserError
from vq4dit.quant.presets import FAMILIES, preset_record
from vq4dit.quant.quantized_linear import QuantizedLinear

if TYPE_CHECKING:
    from vq4dit.calibration.block_calibration import BlockCalibration
    from vq4dit.calibration.block_data import BlockData


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


class Method:
    name: ClassVar[str]
    family: ClassVar[str]          # the preset family this method accepts ("vq" or "uniform")
    fits: ClassVar[bool] = False   # whether prepared layers are trained on the block loss
    seeded: ClassVar[bool] = True  # whether the result depends on the seed (its pool, its k-means start)
    quant: object                  # the preset (a dataclass field of every subclass)

    def __post_init__(self):
        expected = FAMILIES[self.family]
        if not isinstance(self.quant, expected):
            preset = getattr(self.quant, "name", "") or type(self.quant).__name__
            raise UserError(f"quant={preset} is a {getattr(self.quant, 'family', '?')} preset "
                            f"({self.quant.describe() if hasattr(self.quant, 'describe') else self.quant}); "
                            f"method={self.name} needs a {self.family} preset ({expected.__name__})")

    # -- the block loop ------------------------------------------------------------------------------------
    def check(self, linears: dict[str, nn.Linear]) -> None:
        """Raise a one-line UserError if the method or its preset cannot be applied to these layers."""
        self.quant.check(linears)

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
        """The method and its settings as the manifest stores them."""
        settings = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "quant"}
        return {"name": self.name, **settings, "quant": preset_record(self.quant)}
