"""`python export.py ckpt=... out=... [pipeline=true]`: a checkpoint or full-precision weights written as a
diffusers folder (deploy/export.py) or a pipeline folder (deploy/pipeline.py)."""

from pathlib import Path

from vq4dit.deploy.export import export_diffusers
from vq4dit.deploy.pipeline import export_pipeline
from vq4dit.errors import UserError, instantiate
from vq4dit.quant.checkpoint import is_quantized_checkpoint, load_quantized, read_manifest


def export(cfg) -> Path:
    """export.py's job (`cfg`: its Hydra config): a quantized checkpoint (its manifest names the model) or
    full-precision weights of `cfg.model`, written as a diffusers folder at `cfg.out`; with `cfg.pipeline`, as a
    `ConditionalDiTPipeline` folder whose scheduler and call defaults are `cfg.sampler`'s."""
    source, out = Path(cfg.ckpt), Path(cfg.out)
    if out.exists():
        raise UserError(f"out={out} already exists; earlier results are never overwritten")
    if is_quantized_checkpoint(source):
        manifest = read_manifest(source)
        model = load_quantized(source)
        provenance = {key: manifest[key] for key in ("method", "sizes") if key in manifest}
    else:
        model, provenance = instantiate(cfg.model, weights=str(source)), {"source": "full precision"}
    if cfg.get("pipeline", False):
        folder = export_pipeline(model, out, instantiate(cfg.sampler.scheduler), cfg.decode, provenance,
                                 cfg.sampler.guidance_scale, cfg.sampler.steps)
        print(f"wrote {folder}: ConditionalDiTPipeline.from_pretrained({str(folder)!r}), "
              "from vq4dit.deploy.pipeline")
        return folder
    folder = export_diffusers(model, out, cfg.decode, provenance)
    print(f"wrote {folder}: DiTTransformer2DModel.from_pretrained({str(folder)!r}) after `import vq4dit`")
    return folder
