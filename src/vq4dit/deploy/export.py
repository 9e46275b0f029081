"""`python export.py ckpt=<checkpoint> out=<folder>`: a DiT as a diffusers folder that the ordinary
`DiTTransformer2DModel.from_pretrained(folder)` loads (after `import vq4dit`).

The folder holds diffusers' `config.json` (the transformer's own config plus a `quantization_config` for the
`vq4dit` backend: layer records, shared embedders, the original DiT's timestep shift, decode mode) and
`diffusion_pytorch_model.safetensors` with exactly the tensors of the project checkpoint's `model.safetensors`.
A full-precision model exports the same way (no layers; the config keeps its timestep shift), and as a plain
diffusers folder when it has diffusers' own shift.

Weight-only checkpoints only: a checkpoint with activation quantizers is refused (they are simulated, so a
deployed model gains nothing from them). Not carried: the sampler's 3-channel guidance of the original DiT
(`guided_channels`). diffusers' `DiTPipeline` guides all `in_channels`; the config records `guided_channels` for
readers, see the README. `pipeline=true` writes a `ConditionalDiTPipeline` folder instead (deploy/pipeline.py),
which carries it, and runs models that `DiTPipeline` cannot (another class count, no VAE).
"""

import json
import os
import shutil
from pathlib import Path

import diffusers

from vq4dit.deploy.diffusers_quantizer import VQ4DiTConfig
from vq4dit.errors import UserError
from vq4dit.files import save_safetensors
from vq4dit.models import ConditionalDiT
from vq4dit.quant.attention_quantizer import attention_quantizer_record
from vq4dit.quant.checkpoint import (
    VERSION,
    stored_state,
    tensor_digests,
)
from vq4dit.quant.decode import DECODE_MODES

CONFIG, WEIGHTS = "config.json", "diffusion_pytorch_model.safetensors"
DIFFUSERS_TIMESTEP_SHIFT = 1.0  # what diffusers' DiT builds


def export_diffusers(model: ConditionalDiT, folder: Path, decode: str = "per_forward",
                     provenance: dict | None = None) -> Path:
    """Write `model`'s transformer into the new diffusers folder `folder` (via `<folder>.tmp`, then renamed)."""
    folder = Path(folder)
    if decode not in DECODE_MODES:
        raise UserError(f"decode={decode}; valid: {', '.join(DECODE_MODES)}")
    if folder.exists():
        raise UserError(f"{folder} already exists; earlier results are never overwritten")
    transformer = model.transformer
    state = stored_state(transformer)
    check_weight_only(state.layers, attention_quantizer_record(transformer))
    config = {"_class_name": type(transformer).__name__, "_diffusers_version": diffusers.__version__,
              **{k: v for k, v in transformer.config.items() if not k.startswith("_") and k != "quantization_config"}}
    shift = transformer.transformer_blocks[0].norm1.emb.time_proj.downscale_freq_shift
    if state.layers or state.shared or shift != DIFFUSERS_TIMESTEP_SHIFT:
        quant = VQ4DiTConfig(state.layers, state.shared, shift, decode, VERSION,
                             provenance={"guided_channels": model.guided_channels, **(provenance or {})},
                             tensor_sha256=tensor_digests(state.tensors))
        config["quantization_config"] = quant.to_dict()
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_safetensors(state.tensors, tmp / WEIGHTS, metadata={"format": "pt"})
    (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, folder)
    return folder


def check_weight_only(layers: dict[str, dict], attention: dict | None) -> None:
    """diffusers' loader gets weight-only models: activation quantization here is simulated (it saves no memory
    and no time), and the backend does not reinstall its quantizers."""
    acting = [name for name, record in layers.items() if "input_quantizer" in record]
    if acting or attention is not None:
        where = f"{acting[0]} ({len(acting)} layers)" if acting else "the attention matmuls"
        raise UserError(f"this checkpoint quantizes activations at {where}: export carries weight-only "
                        "checkpoints (act=none); load it with vq4dit.api.load_quantized instead")
