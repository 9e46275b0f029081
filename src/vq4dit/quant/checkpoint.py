"""The quantized checkpoint: a folder with `model.safetensors` and `manifest.json`.

Quantized linears are stored as bit-packed codes (`<layer>.codes_packed`, exactly ceil(count * bits / 8) bytes),
an fp16 codebook and an fp32 bias; every other tensor of the transformer is stored as it is. The manifest holds
the model config (enough to rebuild the architecture without the full-precision weights), the quantization and
method configs, per-layer bits, sizes next to fp32/fp16, and per-block calibration MSE.
"""

import json
import math
import os
import shutil
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file

from vq4dit.errors import UserError, instantiate
from vq4dit.models import ConditionalDiT
from vq4dit.quant.block_layers import replace_layer
from vq4dit.quant.packing import code_bits, pack_codes, unpack_codes
from vq4dit.quant.vq_linear import VQLinear

FORMAT = "vq4dit-checkpoint"
MANIFEST, TENSORS = "manifest.json", "model.safetensors"
CODEBOOK_DTYPE = torch.float16


def is_quantized_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / MANIFEST).exists()


def vq_layers(model: ConditionalDiT) -> dict[str, VQLinear]:
    return {n: m for n, m in model.transformer.named_modules() if isinstance(m, VQLinear)}


def save_quantized(model: ConditionalDiT, folder: Path, manifest: dict) -> Path:
    """Written into `<folder>.tmp` and renamed, so a crash never leaves a half checkpoint under the real name."""
    if folder.exists():
        raise UserError(f"{folder} already exists; earlier results are never overwritten")
    layers = vq_layers(model)
    tensors, layer_info = {}, {}
    for name, tensor in model.transformer.state_dict().items():
        owner, _, leaf = name.rpartition(".")
        if owner in layers and leaf == "codes":
            bits = code_bits(layers[owner].k)
            tensors[f"{owner}.codes_packed"] = pack_codes(tensor, bits)
            layer_info[owner] = _layer_info(layers[owner], bits)
        elif owner in layers and leaf == "codebook":
            tensors[name] = tensor.to(CODEBOOK_DTYPE)
        else:
            tensors[name] = tensor
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    manifest = {"format": FORMAT, "version": 1, **manifest, "layers": layer_info,
                "sizes": size_report(model, tensors)}
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, tmp / TENSORS)
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, folder)
    return folder


def load_quantized(folder: Path, model_cfg: DictConfig) -> ConditionalDiT:
    """Rebuild the architecture from the configured model, check it is the model the checkpoint was made from,
    and put VQLinear layers holding the stored codes in place of the quantized linears."""
    manifest = read_manifest(folder)
    stored = manifest["model"]
    if stored["name"] != model_cfg.name or stored["arch"] != OmegaConf.to_container(model_cfg.arch):
        raise UserError(f"checkpoint {folder} holds a quantized {stored['name']}, not model={model_cfg.name}; "
                        f"pass model={stored['name']}")
    model = instantiate(model_cfg, weights=None)
    tensors = load_file(folder / TENSORS)
    for name, info in manifest["layers"].items():
        codes = unpack_codes(tensors.pop(f"{name}.codes_packed"), info["code_bits"], info["num_codes"])
        codebook = tensors.pop(f"{name}.codebook").float()
        bias = tensors.pop(f"{name}.bias", None)
        out_features, in_features = info["shape"]
        replace_layer(model.transformer, name, VQLinear(codes, codebook, bias, out_features, in_features))
    missing, unexpected = model.transformer.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if not k.rsplit(".", 1)[0] in manifest["layers"]]
    if missing or unexpected:
        raise UserError(f"checkpoint {folder} is incomplete or from another model: "
                        f"{(missing or unexpected)[0]} ({len(missing)} missing, {len(unexpected)} unexpected)")
    return model.eval().requires_grad_(False)


def read_manifest(folder: Path) -> dict:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {folder / MANIFEST}: {e}") from None
    if manifest.get("format") != FORMAT:
        raise UserError(f"{folder / MANIFEST} is not a {FORMAT} manifest")
    return manifest


def _layer_info(layer: VQLinear, bits: int) -> dict:
    return {"shape": [layer.out_features, layer.in_features], "k": layer.k, "d": layer.d,
            "bits_per_weight": layer.bits_per_weight, "code_bits": bits, "num_codes": layer.codes.numel()}


def size_report(model: ConditionalDiT, tensors: dict[str, torch.Tensor]) -> dict:
    """Bytes as stored, whole transformer and quantized linears ("blocks only"), next to fp32 and fp16."""
    layers = vq_layers(model)
    nbytes = lambda names: sum(tensors[n].numel() * tensors[n].element_size() for n in names)  # noqa: E731
    quantized = [n for n in tensors if n.rpartition(".")[0] in layers]
    fp_params = lambda ls: sum(l.out_features * l.in_features + (l.bias.numel() if l.bias is not None else 0)  # noqa: E731
                               for l in ls)
    blocks_params = fp_params(layers.values())
    other_params = sum(t.numel() for n, t in tensors.items() if n not in quantized)
    total_params = blocks_params + other_params
    return {
        "model_bytes": nbytes(tensors), "model_fp32_bytes": 4 * total_params, "model_fp16_bytes": 2 * total_params,
        "blocks_bytes": nbytes(quantized), "blocks_fp32_bytes": 4 * blocks_params, "blocks_fp16_bytes": 2 * blocks_params,
        "blocks_bits_per_weight": 8 * nbytes(quantized) / sum(l.out_features * l.in_features for l in layers.values()),
        "codes_bytes": sum(math.ceil(l.codes.numel() * code_bits(l.k) / 8) for l in layers.values()),
    }
