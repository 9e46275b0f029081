"""`ConditionalDiTPipeline`: diffusers' `DiTPipeline` for any class-conditional DiT, the digits model included, and
`export_pipeline`, which writes a pipeline folder for it (`python export.py ckpt=... out=... pipeline=true`).

diffusers' own `DiTPipeline` serves ImageNet DiTs only: it always uses 1000 as the null (unconditional) label, so
a model of C classes other than 1000 fails on an embedding index (the digits DiT's null label is 10), and it always
decodes with a VAE, which a pixel-space model has none of. This subclass takes the null label from the model
(`transformer.config.num_embeds_ada_norm`), decodes like the project's `ConditionalDiT.decode` (the VAE with the
model's `latent_scale` when there is one, else the samples themselves) and denoises with the project's `Sampler`
(original-DiT guidance of the first `guided_channels` channels; every channel when None), so its images are the
`Sampler`'s from the same noise. Its config (model_index.json) holds the model's `guided_channels`, `latent_scale`
and the exported sampler's guidance scale and step count, the defaults of a call.

Load a pipeline folder with `ConditionalDiTPipeline.from_pretrained(folder)`. `DiffusionPipeline.from_pretrained`
cannot: it looks model_index.json's `_class_name` up in the `diffusers` module only (a class from elsewhere needs
code inside the folder and `trust_remote_code=True`, which an export does not ship).
"""

import json
import os
import shutil
from pathlib import Path

import diffusers
import torch
from diffusers import AutoencoderKL, DiTPipeline, DiTTransformer2DModel, SchedulerMixin
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from vq4dit.deploy.export import export_diffusers
from vq4dit.errors import UserError
from vq4dit.models import ConditionalDiT
from vq4dit.sampling import Sampler

INDEX = "model_index.json"


class ConditionalDiTPipeline(DiTPipeline):
    """`DiTPipeline(transformer, vae, scheduler)` whose null label is the model's class count and whose VAE is
    optional (None: a pixel-space model, `latent_scale` 1)."""

    _optional_components = ["vae"]

    def __init__(self, transformer: DiTTransformer2DModel, scheduler: SchedulerMixin,
                 vae: AutoencoderKL | None = None, guided_channels: int | None = None, latent_scale: float = 1.0,
                 guidance_scale: float = 4.0, num_inference_steps: int = 50):
        super().__init__(transformer=transformer, vae=vae, scheduler=scheduler)
        self.register_to_config(guided_channels=guided_channels, latent_scale=latent_scale,
                                guidance_scale=guidance_scale, num_inference_steps=num_inference_steps)

    def model(self) -> ConditionalDiT:
        """The project's view of the pipeline's modules (no copy): what `Sampler` and `decode` take."""
        return ConditionalDiT(self.transformer, "pipeline", self.config.guided_channels, self.vae,
                              self.config.latent_scale).eval()

    @torch.no_grad()
    def __call__(self, class_labels: list[int], guidance_scale: float | None = None,
                 generator: torch.Generator | list[torch.Generator] | None = None,
                 num_inference_steps: int | None = None, output_type: str | None = "pil",
                 return_dict: bool = True) -> ImagePipelineOutput | tuple:
        """One image per label, as `DiTPipeline.__call__` (images in [0, 1]; "pil", "np" or "pt"). The initial
        noise is drawn in fp32 from `generator` first, then the scheduler's step noise (if any) from the same
        generator. `guidance_scale` and `num_inference_steps` default to the exported sampler's."""
        model = self.model()
        labels = self._checked_labels(class_labels, model.num_classes)
        if model.vae is None and model.latent_scale != 1.0:
            raise UserError(f"this pipeline has no VAE but latent_scale={model.latent_scale} (a latent model); "
                            "valid: pass vae=AutoencoderKL.from_pretrained(...) to from_pretrained")
        guidance = self.config.guidance_scale if guidance_scale is None else guidance_scale
        steps = self.config.num_inference_steps if num_inference_steps is None else num_inference_steps
        device = self._execution_device
        sampler = Sampler(self.scheduler, steps, guidance, batch_size=len(labels), device=str(device))
        shape = (len(labels), model.in_channels, model.sample_size, model.sample_size)
        noise = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)  # Sampler's draw
        bar = self.progress_bar(total=steps)
        try:
            x = sampler._denoise(model, noise, labels, generator, None, bar)  # the Sampler's own loop
        finally:
            bar.close()
        images = model.decode(x).float() / 2 + 0.5  # [-1, 1] -> [0, 1]
        if output_type != "pt":
            images = images.cpu().permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                images = self.numpy_to_pil(images)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    @staticmethod
    def _checked_labels(class_labels, num_classes: int) -> torch.Tensor:
        labels = torch.as_tensor(class_labels).reshape(-1)
        bad = [v for v in labels.tolist() if not isinstance(v, int) or not 0 <= v < num_classes]
        if bad or not len(labels):
            raise UserError(f"class_labels={bad[0] if bad else '[]'}; valid: one or more integers 0 to "
                            f"{num_classes - 1} (the model's {num_classes} classes; {num_classes} is the null label)")
        return labels.long()


def export_pipeline(model: ConditionalDiT, folder: Path, scheduler: SchedulerMixin, decode: str = "per_forward",
                    provenance: dict | None = None, guidance_scale: float = 4.0,
                    num_inference_steps: int = 50) -> Path:
    """A `ConditionalDiTPipeline` folder: model_index.json, transformer/ (`export_diffusers`), scheduler/ and,
    when the model has one, vae/. Written into `<folder>.tmp`, then renamed."""
    folder = Path(folder)
    if folder.exists():
        raise UserError(f"{folder} already exists; earlier results are never overwritten")
    if model.vae is None and model.latent_scale != 1.0:
        raise UserError(f"pipeline=true: {model.name} has latent_scale={model.latent_scale} (it decodes with a VAE) "
                        "but no VAE was loaded; valid: full-precision weights with model.vae=<folder>, or "
                        "pipeline=false and ConditionalDiTPipeline(transformer, scheduler, vae=...) in Python")
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    export_diffusers(model, tmp / "transformer", decode, provenance)
    scheduler.save_pretrained(tmp / "scheduler")
    if model.vae is not None:
        model.vae.save_pretrained(tmp / "vae")
    index = {"_class_name": ConditionalDiTPipeline.__name__, "_diffusers_version": diffusers.__version__,
             "_module": ConditionalDiTPipeline.__module__,  # for readers: diffusers ignores `_` keys
             "transformer": ["diffusers", type(model.transformer).__name__],
             "scheduler": ["diffusers", type(scheduler).__name__],
             "vae": ["diffusers", type(model.vae).__name__] if model.vae is not None else [None, None],
             "guided_channels": model.guided_channels, "latent_scale": model.latent_scale,
             "guidance_scale": guidance_scale, "num_inference_steps": num_inference_steps}
    (tmp / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, folder)
    return folder
