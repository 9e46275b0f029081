"""Zero-data calibration inputs: DiT blocks' inputs captured from the full-precision model's own sampling.

Gaussian latents and random labels run through the full-precision sampler (with the null label for guidance);
every denoising step's model input (x_t, t, y) is a candidate, and a seeded random subset of `pool_size` of them
is the pool. `hidden` holds the pool's input to the current block; `advance(block)` moves it one block on, so
each block's inputs are computed once (AQLM/GPTQ-style) instead of re-running the sampler per block.
"""

import torch
from torch import nn

from vq4dit.models import ConditionalDiT
from vq4dit.sampling import Sampler


class ZeroDataBlockInputs:
    def __init__(self, model: ConditionalDiT, sampler: Sampler, num_trajectories: int, pool_size: int, seed: int,
                 chunk: int = 256, progress: bool = True):
        steps = []
        labels = torch.randint(0, model.num_classes, (num_trajectories,), generator=torch.Generator().manual_seed(seed))
        sampler.sample(model, labels, seed=seed, progress=progress, decode=False,
                       on_step=lambda x, t, y: steps.append((x.cpu(), t.cpu(), y.cpu())))
        x, t, y = (torch.cat(parts) for parts in zip(*steps))
        if pool_size < len(x):  # a uniform subset over trajectories, steps and (guided, null) halves
            keep = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed + 1))[:pool_size].sort().values
            x, t, y = x[keep], t[keep], y[keep]
        self.timesteps, self.labels, self.chunk = t, y, chunk
        device = next(model.transformer.parameters()).device
        with torch.no_grad():
            self.hidden = self._map(lambda xs, *_: model.transformer.pos_embed(xs.to(device)).cpu(), x)

    def __len__(self) -> int:
        return len(self.hidden)

    @torch.no_grad()
    def block_outputs(self, block: nn.Module, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """`block` applied to the whole pool (default: to the current inputs), chunk by chunk, on block's device."""
        device = next(block.parameters()).device
        return self._map(lambda h, t, y: block(h.to(device), timestep=t.to(device), class_labels=y.to(device)).cpu(),
                         self.hidden if hidden is None else hidden)

    def advance(self, block: nn.Module) -> None:
        self.hidden = self.block_outputs(block)

    def _map(self, fn, rows: torch.Tensor) -> torch.Tensor:
        return torch.cat([fn(rows[i:i + self.chunk], self.timesteps[i:i + self.chunk], self.labels[i:i + self.chunk])
                          for i in range(0, len(rows), self.chunk)])
