"""What one block's quantization sees: the full-precision block, its pool rows and targets, and the device.

Training rows are what calibration may use (fitting, Hessians, statistics); held-out rows, from trajectories of
their own, only score blocks. Rows live in host memory (or already on `device`) and are streamed to `device` chunk
by chunk; every tensor a step touches is moved to `device` explicitly, never to wherever a module happens to be.
Block errors run under the calibration's `precision` autocast, like the teacher's targets; observed layer inputs
(GPTQ's Hessians) are computed in fp32 whatever the precision.
"""

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from vq4dit.precision import autocast
from vq4dit.quant.block_layers import replace_layer

Rows = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # block input, timestep, label, fp output


@dataclass
class BlockData:
    block: nn.Module           # the full-precision block (on `device`); its outputs on the rows are the targets
    index: int
    train: Rows
    heldout: Rows
    device: torch.device
    seed: int
    chunk: int = 256
    precision: str = "fp32"    # autocast of block errors (fp32, bf16, fp16)
    # layer name -> its input quantizer, once the method has them: observed inputs are then what the quantized
    # layer will see (GPTQ's Hessians of quantized activations, as Q-DiT computes them)
    input_quantizers: dict = field(default_factory=dict)
    memo: dict = field(default_factory=dict)  # what a method computed once from the rows (input moments ...)

    def layer_seed(self, j: int) -> int:
        return self.seed + 1000 * self.index + j

    @torch.no_grad()
    def heldout_mse(self, block: nn.Module, device: torch.device | None = None) -> torch.Tensor:
        """Mean squared error of `block`'s outputs against the fp block's on the held-out rows (a 0-d tensor on
        `device`, default this block's device)."""
        device = device or self.device
        x, t, y, target = self.heldout
        total = torch.zeros((), dtype=torch.float64, device=device)
        for i in range(0, len(x), self.chunk):
            rows = slice(i, i + self.chunk)
            with autocast(device, self.precision):
                out = block(x[rows].to(device), timestep=t[rows].to(device), class_labels=y[rows].to(device))
            total += (out.float() - target[rows].to(device).float()).square().sum(dtype=torch.float64)
        return total / target.numel()

    @torch.no_grad()
    def observe_inputs(self, names: list[str], observe: Callable[[str, torch.Tensor], None],
                       rows: torch.Tensor | None = None) -> None:
        """Run the fp block over the training rows (or those of them `rows` indexes); `observe(name, x)` receives
        the input of every named linear (through the layer's input quantizer, if `input_quantizers` has one)."""
        def hook(name):
            quantizer = self.input_quantizers.get(name)
            return lambda _, args: observe(name, args[0] if quantizer is None else quantizer(args[0]))

        hooks = [self.block.get_submodule(name).register_forward_pre_hook(hook(name)) for name in names]
        try:
            x, t, y, _ = self.train
            if rows is not None:
                x, t, y = x[rows], t[rows], y[rows]
            for i in range(0, len(x), self.chunk):
                rows = slice(i, i + self.chunk)
                self.block(x[rows].to(self.device), timestep=t[rows].to(self.device),
                           class_labels=y[rows].to(self.device))
        finally:
            for hook in hooks:
                hook.remove()


def with_layers(block: nn.Module, layers: dict[str, nn.Module]) -> nn.Module:
    """A copy of `block` whose named linears are `layers` (the layers themselves, not copies)."""
    copied = copy.deepcopy(block)
    for name, layer in layers.items():
        replace_layer(copied, name, layer)
    return copied
