"""Zero-data calibration inputs: DiT blocks' inputs captured from the full-precision model's own sampling.

Gaussian latents and random labels run through the full-precision sampler (with the null label for guidance);
every denoising step's model input (x_t, t, y) is a candidate, and a seeded random subset of them is the pool.
Held-out rows come from trajectories of their own (their own noise and labels), so the block error they measure
is on inputs calibration never trained on. Every stream is derived from the seed with its own purpose
(`vq4dit.seeds`), so evaluation, which uses the "eval" stream, never starts from calibration's noise.

`hidden` holds every row's input to the current block (training rows first, then held-out rows), in host memory;
`block_outputs(block, device)` streams it through a block chunk by chunk on `device`, so each block's inputs and
its teacher's outputs are computed once (AQLM/GPTQ-style) instead of re-running the sampler per block.
"""

import torch
from torch import nn

from vq4dit.errors import UserError
from vq4dit.models import ConditionalDiT
from vq4dit.sampling import Sampler
from vq4dit.seeds import generator, stream_seed


class ZeroDataBlockInputs:
    def __init__(self, model: ConditionalDiT, sampler: Sampler, trajectories: int, size: int, seed: int,
                 heldout_trajectories: int = 8, heldout_size: int = 256, chunk: int = 256, progress: bool = True):
        check_pool_sizes(trajectories=trajectories, size=size, heldout_trajectories=heldout_trajectories,
                         heldout_size=heldout_size)
        self.chunk, self.sampler = chunk, sampler
        train = _visit(model, sampler, trajectories, size, seed, "calibration", progress)
        heldout = _visit(model, sampler, heldout_trajectories, heldout_size, seed, "calibration-heldout", progress)
        x, self.timesteps, self.labels = (torch.cat(parts) for parts in zip(train, heldout))
        self.num_train = len(train[0])
        device = next(model.transformer.parameters()).device
        with torch.no_grad():
            self.hidden = self._map(lambda xs, *_: model.transformer.pos_embed(xs.to(device)).cpu(), x)

    def __len__(self) -> int:
        return len(self.hidden)

    @property
    def train_rows(self) -> slice:
        return slice(0, self.num_train)

    @property
    def heldout_rows(self) -> slice:
        return slice(self.num_train, len(self))

    @torch.no_grad()
    def block_outputs(self, block: nn.Module, device: torch.device | str,
                      hidden: torch.Tensor | None = None) -> torch.Tensor:
        """`block` applied on `device` to every row (default: to the current inputs); the result in host memory."""
        return self._map(lambda h, t, y: block(h.to(device), timestep=t.to(device), class_labels=y.to(device)).cpu(),
                         self.hidden if hidden is None else hidden)

    def advance(self, block: nn.Module, device: torch.device | str) -> None:
        self.hidden = self.block_outputs(block, device)

    def _map(self, fn, rows: torch.Tensor) -> torch.Tensor:
        return torch.cat([fn(rows[i:i + self.chunk], self.timesteps[i:i + self.chunk], self.labels[i:i + self.chunk])
                          for i in range(0, len(rows), self.chunk)])


def check_pool_sizes(**sizes: int) -> None:
    for name, value in sizes.items():
        if value < 1:
            raise UserError(f"pool.{name}={value}; valid: a positive integer")


def _visit(model: ConditionalDiT, sampler: Sampler, trajectories: int, size: int, seed: int, purpose: str,
           progress: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_t, t, y) of a seeded subset of `size` rows among every step of `trajectories` fp sampling runs."""
    steps = []
    labels = torch.randint(0, model.num_classes, (trajectories,), generator=generator(seed, f"{purpose}-labels"))
    sampler.sample(model, labels, seed=stream_seed(seed, purpose), progress=progress, decode=False,
                   on_step=lambda x, t, y: steps.append((x.cpu(), t.cpu(), y.cpu())))
    x, t, y = (torch.cat(parts) for parts in zip(*steps))
    if size < len(x):  # a uniform subset over trajectories, steps and (guided, null) halves
        keep = torch.randperm(len(x), generator=generator(seed, f"{purpose}-rows"))[:size].sort().values
        x, t, y = x[keep], t[keep], y[keep]
    return x, t, y
