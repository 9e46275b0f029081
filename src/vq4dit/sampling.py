"""Class-conditional sampling with classifier-free guidance on diffusers' schedulers.

Noise comes from CPU generators seeded per run, so a fixed seed gives the same images on any device and on
re-run; callers pass a seed derived for their purpose (`vq4dit.seeds`), so evaluation and calibration never share
noise. Guidance follows the original DiT: the model sees the batch twice (labels, then the null label) and only
the first `guided_channels` output channels are mixed; the other channels (and a learned variance) keep the
conditional prediction. `precision` runs the model (and the VAE) under autocast in bf16 or fp16; the scheduler's
arithmetic stays in fp32.
"""

import contextlib
import copy
from collections.abc import Callable, Iterator

import torch
from diffusers import SchedulerMixin
from tqdm.auto import tqdm

from vq4dit import seeds
from vq4dit.models import ConditionalDiT
from vq4dit.precision import autocast, check_precision

# called at every denoising step with the exact model input: (x_t, t, labels), CFG-doubled when guiding
StepHook = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]


class Sampler:
    def __init__(self, scheduler: SchedulerMixin, steps: int, guidance_scale: float, batch_size: int,
                 device: str = "cpu", precision: str = "fp32"):
        check_precision(precision, "sampler.precision")
        self.scheduler, self.steps, self.guidance_scale = scheduler, steps, guidance_scale
        self.batch_size, self.device, self.precision = batch_size, torch.device(device), precision

    def record(self) -> dict:
        """What determines the samples (not the batch size or device): the scheduler's class and config, the
        steps, guidance and precision."""
        config = {k: v for k, v in self.scheduler.config.items() if not k.startswith("_")}
        return {"scheduler": {"class": type(self.scheduler).__name__, **config}, "steps": self.steps,
                "guidance_scale": self.guidance_scale, "precision": self.precision}

    @torch.no_grad()
    def sample(self, model: ConditionalDiT, labels: torch.Tensor, seed: int, progress: bool = True,
               on_step: StepHook | None = None, decode: bool = True) -> torch.Tensor:
        """Images in [-1, 1] (or model-space samples with decode=False), one per label, on the CPU."""
        return torch.cat([x.float().cpu() for _, x in self.batches(model, labels, seed, progress, on_step, decode)])

    @torch.no_grad()
    def batches(self, model: ConditionalDiT, labels: torch.Tensor, seed: int, progress: bool = True,
                on_step: StepHook | None = None, decode: bool = True) -> Iterator[tuple[int, torch.Tensor]]:
        """(index of the batch's first sample, its images in [-1, 1] on the sampler's device), batch by batch,
        so that any number of samples streams through constant memory. Same images as `sample`."""
        shape = (model.in_channels, model.sample_size, model.sample_size)
        # one generator drawn batch by batch: the same numbers as one draw for all samples whenever a batch's
        # size is a multiple of 16 values (every latent and image shape here), without holding all the noise
        noise = torch.Generator().manual_seed(seed)
        batches = range(0, len(labels), self.batch_size)
        bar = tqdm(total=len(batches) * self.steps, desc="sampling", disable=not progress, leave=False)
        try:
            for b, start in enumerate(batches):
                y = labels[start:start + self.batch_size]
                x = torch.randn((len(y), *shape), generator=noise)
                step_noise = seeds.generator(seed, f"step-noise-{b}")
                x = self._denoise(model, x, y, step_noise, on_step, bar)
                if decode:
                    with self.autocast():
                        x = model.decode(x)
                yield start, x.float()
        finally:
            bar.close()

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, self.precision)

    def _denoise(self, model, x, y, generator, on_step, bar) -> torch.Tensor:
        scheduler = copy.deepcopy(self.scheduler)
        scheduler.set_timesteps(self.steps)
        dtype = next(model.transformer.parameters()).dtype
        x = x.to(self.device, dtype) * scheduler.init_noise_sigma
        y = y.to(self.device)
        keep_variance = model.learns_sigma and scheduler.config.get("variance_type") in ("learned", "learned_range")
        for t in scheduler.timesteps:
            x_in = scheduler.scale_model_input(x, t)
            with self.autocast():
                out = self.guided_output(model, x_in, t, y, on_step)
            if not keep_variance:
                out = out[:, : model.in_channels]
            x = scheduler.step(out.float(), t, x.float(), generator=generator).prev_sample.to(dtype)
            bar.update()
        return x

    def guided_output(self, model: ConditionalDiT, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                      on_step: StepHook | None = None) -> torch.Tensor:
        t_batch = torch.full((len(x),), int(t), device=x.device, dtype=torch.long)
        if self.guidance_scale == 1.0:
            if on_step:
                on_step(x, t_batch, y)
            return model(x, t_batch, y).float()
        x2, t2 = torch.cat([x, x]), torch.cat([t_batch, t_batch])
        y2 = torch.cat([y, torch.full_like(y, model.null_label)])
        if on_step:
            on_step(x2, t2, y2)
        cond, uncond = model(x2, t2, y2).float().chunk(2)  # mix in fp32 whatever precision the model ran in
        g = model.guided_channels or model.in_channels
        guided = cond.clone()
        guided[:, :g] = uncond[:, :g] + self.guidance_scale * (cond[:, :g] - uncond[:, :g])
        return guided


def balanced_labels(num_samples: int, num_classes: int) -> torch.Tensor:
    """0, 1, ..., C-1, 0, 1, ...: every class equally often, the same list on every run."""
    return torch.arange(num_samples) % num_classes
