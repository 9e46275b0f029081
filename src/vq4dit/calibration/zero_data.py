"""Zero-data calibration inputs: DiT blocks' inputs captured from the full-precision model's own sampling.

Gaussian latents run through the full-precision sampler (with the null label for guidance) and every denoising
step's model input (x_t, t, y) is a candidate row. The pool covers the label space: the trajectories' labels are
balanced over the classes (a seeded class order, cycled: each class equally often, up to one), there is at least
one trajectory per class by default (`trajectories=None`: max(64, classes), so 1000 at DiT-XL/2), and the rows are
chosen per trajectory, not from all candidates at once: each trajectory gives `size / trajectories` rows (up to
one more) at distinct random steps, its guided row first, then alternating with the null label, so every class a
trajectory has appears among the guided training rows. Rows are chosen before sampling and kept as their step
passes: the pool never holds every step's latents (at DiT-XL/2, 1000 trajectories x 250 steps x 2 would be 8 GB).
Held-out rows come from trajectories of their own (their own noise and labels), so the block error they measure
is on inputs calibration never trained on. Every stream is derived from the seed with its own purpose
(`vq4dit.seeds`), so evaluation, which uses the "eval" stream, never starts from calibration's noise.

`hidden` holds every row's input to the current block (training rows first, then held-out rows), in host memory;
`block_outputs(block, device)` streams it through a block chunk by chunk on `device`, so each block's inputs and
its teacher's outputs are computed once (AQLM/GPTQ-style) instead of re-running the sampler per block.
"""

import copy
import logging

import torch
from torch import nn

from vq4dit.calibration.settings import PoolSettings
from vq4dit.errors import UserError
from vq4dit.models import ConditionalDiT
from vq4dit.sampling import Sampler
from vq4dit.seeds import generator, stream_seed

log = logging.getLogger(__name__)
MIN_TRAJECTORIES = 64  # the default when the model has fewer classes


class ZeroDataBlockInputs:
    def __init__(self, model: ConditionalDiT, sampler: Sampler, trajectories: int | None, size: int, seed: int,
                 heldout_trajectories: int = 8, heldout_size: int = 256, chunk: int = 256, progress: bool = True):
        trajectories = covering_trajectories(trajectories, model.num_classes)
        check_pool_sizes(trajectories=trajectories, size=size, heldout_trajectories=heldout_trajectories,
                         heldout_size=heldout_size)
        self.chunk, self.trajectories, self.sampler = chunk, trajectories, sampler
        self.heldout_trajectories = heldout_trajectories
        train = _visit(model, sampler, trajectories, size, seed, "calibration", progress)
        heldout = _visit(model, sampler, heldout_trajectories, heldout_size, seed, "calibration-heldout", progress)
        x, self.timesteps, self.labels = (torch.cat(parts) for parts in zip(train, heldout))
        self.inputs = x  # the model inputs x_t themselves (a model-level fit runs the whole model on them)
        self.num_train = len(train[0])
        for name, asked, got in (("size", size, self.num_train), ("heldout_size", heldout_size, len(heldout[0]))):
            if got < asked:  # each trajectory gives at most one row per step (two with guidance)
                log.warning("pool.%s=%d: the trajectories' steps give only %d rows; the pool (and the checkpoint's "
                            "record) holds %d", name, asked, got, got)
        device = next(model.transformer.parameters()).device
        with torch.no_grad():
            self.hidden = self._map(lambda xs, *_: model.transformer.pos_embed(xs.to(device)).cpu(), x)

    @classmethod
    def of(cls, model: ConditionalDiT, sampler: Sampler, settings: PoolSettings, seed: int,
           progress: bool = True) -> "ZeroDataBlockInputs":
        return cls(model, sampler, settings.trajectories, settings.size, seed, settings.heldout_trajectories,
                   settings.heldout_size, progress=progress)

    def __len__(self) -> int:
        return len(self.hidden)

    def record(self, student_inputs: str) -> dict:
        """The pool as a checkpoint records it: the rows it holds (trajectories resolved), what the students saw
        and the sampler whose trajectories it holds."""
        return {"trajectories": self.trajectories, "size": self.num_train,
                "heldout_trajectories": self.heldout_trajectories, "heldout_size": len(self) - self.num_train,
                "student_inputs": student_inputs, "sampler": self.sampler.record()}

    @property
    def train_rows(self) -> slice:
        return slice(0, self.num_train)

    @property
    def heldout_rows(self) -> slice:
        return slice(self.num_train, len(self))

    @torch.no_grad()
    def block_outputs(self, block: nn.Module, device: torch.device | str,
                      hidden: torch.Tensor | None = None) -> torch.Tensor:
        """`block` applied on `device` to every row (default: to the current inputs); the result in host memory,
        fp32 whatever precision the block ran in."""
        return self._map(lambda h, t, y: block(h.to(device), timestep=t.to(device),
                                               class_labels=y.to(device)).float().cpu(),
                         self.hidden if hidden is None else hidden)

    def _map(self, fn, rows: torch.Tensor) -> torch.Tensor:
        return torch.cat([fn(rows[i:i + self.chunk], self.timesteps[i:i + self.chunk], self.labels[i:i + self.chunk])
                          for i in range(0, len(rows), self.chunk)])


def covering_trajectories(trajectories: int | None, num_classes: int) -> int:
    """`trajectories`, or by default one per class (at least 64); fewer than the classes leave classes out."""
    if trajectories is None:
        return max(MIN_TRAJECTORIES, num_classes)
    if 0 < trajectories < num_classes:
        log.warning("pool.trajectories=%d covers %d of the model's %d classes; pool.trajectories=null gives one "
                    "trajectory per class", trajectories, trajectories, num_classes)
    return trajectories


def check_pool_sizes(**sizes: int | None) -> None:
    for name, value in sizes.items():
        if value is not None and value < 1:
            raise UserError(f"pool.{name}={value}; valid: a positive integer"
                            + (" or null (one per class)" if name == "trajectories" else ""))


def balanced_trajectory_labels(trajectories: int, num_classes: int, gen: torch.Generator) -> torch.Tensor:
    """A seeded order of the classes, cycled: every class equally often (up to one); fewer trajectories than
    classes get distinct classes."""
    order = torch.randperm(num_classes, generator=gen)
    return order[torch.arange(trajectories) % num_classes]


def row_plan(trajectories: int, size: int, steps: int, halves: int, gen: torch.Generator) -> dict[int, list]:
    """step -> [(trajectory, half)] of the rows to keep: `size` rows spread evenly over the trajectories (the
    remainder to a seeded few), each trajectory's at distinct random steps; half 0 is the guided row (the
    trajectory's label), half 1 the null-label row of guidance, alternating, guided first."""
    per = torch.full((trajectories,), size // trajectories)
    per[torch.randperm(trajectories, generator=gen)[: size % trajectories]] += 1
    per.clamp_(max=steps * halves)
    plan: dict[int, list] = {}
    for j in range(trajectories):
        order = torch.randperm(steps, generator=gen).tolist()
        for k in range(int(per[j])):  # the second pass over the steps takes the other half of each step
            plan.setdefault(order[k % steps], []).append((j, (k + k // steps) % halves))
    return plan


def _visit(model: ConditionalDiT, sampler: Sampler, trajectories: int, size: int, seed: int, purpose: str,
           progress: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_t, t, y) of the planned rows of `trajectories` fp sampling runs, kept as their steps pass."""
    labels = balanced_trajectory_labels(trajectories, model.num_classes, generator(seed, f"{purpose}-labels"))
    scheduler = copy.deepcopy(sampler.scheduler)
    scheduler.set_timesteps(sampler.steps)
    halves = 1 if sampler.guidance_scale == 1.0 else 2  # guidance doubles each step's batch (labels, null label)
    plan = row_plan(trajectories, size, len(scheduler.timesteps), halves, generator(seed, f"{purpose}-rows"))
    kept, state = [], {"first": 0, "step": 0}

    def keep(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> None:
        n, first = len(x) // halves, state["first"]
        rows = sorted((j - first) + half * n for j, half in plan.get(state["step"], ()) if first <= j < first + n)
        if rows:
            index = torch.tensor(rows, device=x.device)
            kept.append((x[index].float().cpu(), t[index].cpu(), y[index].cpu()))
        state["step"] += 1

    for start, batch in sampler.batches(model, labels, seed=stream_seed(seed, purpose), progress=progress,
                                        on_step=keep, decode=False):
        state.update(first=start + len(batch), step=0)
    x, t, y = (torch.cat(parts) for parts in zip(*kept))
    return x, t, y
