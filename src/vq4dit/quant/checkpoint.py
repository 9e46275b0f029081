"""The quantized checkpoint: a folder with `model.safetensors` and `manifest.json`.

Every quantized linear is stored in its deployed layer type's own form (`QuantizedLinear.stored`: bit-packed
codes, codebook or scales/zeros, bias) under `<layer>.<tensor>`, and the manifest records each layer's type and
parameters, so loading dispatches on the record, never on tensor names. Every other tensor of the transformer is
stored as it is. The manifest also holds the model config (the architecture is rebuilt without the
full-precision weights), the method and preset, per-block calibration statistics, and sizes counted from the
stored tensors next to fp32/fp16. Activation quantizers travel with their layers (static scales as tensors under
`<layer>.input_quantizer.*`); attention-matmul quantizers, which hold no tensors, as the manifest's
`attention_quantizers` settings.
"""

import json
import os
import shutil
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file

from vq4dit.errors import UserError, instantiate
from vq4dit.models import ConditionalDiT
from vq4dit.quant.attention_quantizer import attention_quantizer_record, install_attention_quantizers
from vq4dit.quant.block_layers import replace_layer
from vq4dit.quant.quantized_linear import QuantizedLinear, from_stored, is_weight_encoding, stored_form

FORMAT = "vq4dit-checkpoint"
VERSION = 2
MANIFEST, TENSORS = "manifest.json", "model.safetensors"


def is_quantized_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / MANIFEST).exists()


def quantized_layers(model: ConditionalDiT) -> dict[str, QuantizedLinear]:
    return {n: m for n, m in model.transformer.named_modules() if isinstance(m, QuantizedLinear)}


def save_quantized(model: ConditionalDiT, folder: Path, manifest: dict | None = None) -> Path:
    """Written into `<folder>.tmp` and renamed, so a crash never leaves a half checkpoint under the real name.
    `manifest["model"]` is the model config `load_quantized` rebuilds (default: the model's own architecture)."""
    folder = Path(folder)
    manifest = {"model": model.config_record(), **(manifest or {})}
    if folder.exists():
        raise UserError(f"{folder} already exists; earlier results are never overwritten")
    layers = quantized_layers(model)
    tensors, records = {}, {}
    for name, layer in layers.items():
        stored, record = stored_form(layer)
        tensors.update({f"{name}.{key}": t for key, t in stored.items()})
        encoding = sum(t.numel() * t.element_size() for key, t in stored.items() if is_weight_encoding(key))
        records[name] = {**record, "bits_per_weight": 8 * encoding / layer.num_weights}
    for name, tensor in model.transformer.state_dict().items():
        if owning_layer(name, layers) is None:
            tensors[name] = tensor
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    manifest = {"format": FORMAT, "version": VERSION, **manifest, "layers": records,
                "sizes": size_report(layers, tensors)}
    attention = attention_quantizer_record(model.transformer)
    if attention is not None:  # settings only: the processors hold no tensors
        manifest["attention_quantizers"] = attention
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, tmp / TENSORS)
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, folder)
    return folder


def load_quantized(folder: Path, model_cfg: DictConfig | None = None) -> ConditionalDiT:
    """Rebuild the architecture (from `model_cfg`, checked against the manifest, or from the manifest's own model
    config) and put the stored deployed layers in place of the quantized linears."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    stored = manifest["model"]
    if model_cfg is None:
        model_cfg = OmegaConf.create(stored)
    elif stored["name"] != model_cfg.name or stored["arch"] != OmegaConf.to_container(model_cfg.arch):
        raise UserError(f"checkpoint {folder} holds a quantized {stored['name']}, not model={model_cfg.name}; "
                        f"pass model={stored['name']}")
    model = instantiate(model_cfg, weights=None)
    tensors = load_file(folder / TENSORS)
    for name, record in manifest["layers"].items():
        prefix = f"{name}."
        own = {key[len(prefix):]: tensors.pop(key) for key in [k for k in tensors if k.startswith(prefix)]}
        replace_layer(model.transformer, name, from_stored(own, record))
    install_attention_quantizers(model.blocks, manifest.get("attention_quantizers"))
    missing, unexpected = model.transformer.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if owning_layer(k, manifest["layers"]) is None]
    if missing or unexpected:
        raise UserError(f"checkpoint {folder} is incomplete or from another model: "
                        f"{(missing or unexpected)[0]} ({len(missing)} missing, {len(unexpected)} unexpected)")
    return model.eval().requires_grad_(False)


def owning_layer(tensor_name: str, layers) -> str | None:
    """The quantized layer a state-dict entry belongs to (its own tensors or its input quantizer's), or None."""
    prefix = tensor_name.rpartition(".")[0]
    while prefix:
        if prefix in layers:
            return prefix
        prefix = prefix.rpartition(".")[0]
    return None


def read_manifest(folder: Path) -> dict:
    try:
        manifest = json.loads((Path(folder) / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {Path(folder) / MANIFEST}: {e}") from None
    if manifest.get("format") != FORMAT:
        raise UserError(f"{Path(folder) / MANIFEST} is not a {FORMAT} manifest")
    if manifest.get("version") != VERSION:
        raise UserError(f"{Path(folder) / MANIFEST} is format version {manifest.get('version')}; this code reads "
                        f"version {VERSION} (re-run train.py to rewrite the checkpoint)")
    return manifest


def size_report(layers: dict[str, QuantizedLinear], tensors: dict[str, torch.Tensor]) -> dict:
    """Bytes as stored, for the whole transformer and for the quantized linears, next to fp32 and fp16; bits per
    weight of the quantized linears counted from their stored tensors (codes + codebooks / scales / zeros, biases
    apart)."""
    nbytes = lambda names: sum(tensors[n].numel() * tensors[n].element_size() for n in names)  # noqa: E731
    quantized = [n for n in tensors if n.rpartition(".")[0] in layers]  # the layers' own tensors (not input quantizers')
    biases = [n for n in quantized if n.endswith(".bias")]
    weights = sum(layer.num_weights for layer in layers.values())
    linear_params = weights + sum(tensors[n].numel() for n in biases)
    total_params = linear_params + sum(t.numel() for n, t in tensors.items() if n not in quantized)
    return {
        "model_bytes": nbytes(tensors), "model_fp32_bytes": 4 * total_params, "model_fp16_bytes": 2 * total_params,
        "blocks_bytes": nbytes(quantized), "blocks_fp32_bytes": 4 * linear_params, "blocks_fp16_bytes": 2 * linear_params,
        "blocks_encoding_bytes": nbytes(quantized) - nbytes(biases),
        "blocks_bits_per_weight": 8 * (nbytes(quantized) - nbytes(biases)) / max(weights, 1),
    }
