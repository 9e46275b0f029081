"""The quantized checkpoint: a folder with `model.safetensors` and `manifest.json`.

Every quantized linear is stored in its deployed layer type's own form (`QuantizedLinear.stored`: bit-packed
codes, codebook or scales/zeros, bias) under `<layer>.<tensor>`, and the manifest records each layer's type,
parameters and tensor names, so loading dispatches on the record, never on tensor names. Every other tensor of the
transformer is stored as it is, once: a block's timestep/label embedder that equals block 0's is not stored again
(`shared` in the manifest; models/embedders.py). The manifest also holds the model record (the architecture is
rebuilt from it without the full-precision weights, always by `load_dit`: a checkpoint never chooses code), the
method and preset, per-block calibration statistics, and sizes counted from the stored tensors next to fp32/fp16.

Loading builds the architecture with its parameters on the meta device, reads one layer's tensors at a time
from the file and puts the deployed layer in place, so the peak is the quantized model plus one layer's
temporaries: the full-precision model is never allocated. Activation quantizers travel with their layers
(static scales as tensors under `<layer>.input_quantizer.*`); attention-matmul quantizers, which hold no
tensors, as the manifest's `attention_quantizers` settings.

A checkpoint proves its bytes: the manifest holds every stored tensor's sha256 (`tensor_sha256`, version 5), and
each tensor is hashed as it is read and refused, by name, when it differs; each layer's record is then checked
against its tensors by its type's `from_stored` before the layer is used.
"""

import json
import math
import os
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from vq4dit.errors import UserError
from vq4dit.files import save_safetensors
from vq4dit.models import ConditionalDiT, load_dit
from vq4dit.models.dit import full_arch, record_arguments
from vq4dit.models.embedders import share_embedders, shared_embedders
from vq4dit.quant.attention_quantizer import attention_quantizer_record, install_attention_quantizers
from vq4dit.quant.block_layers import replace_layer
from vq4dit.quant.decode import DECODE_MODES
from vq4dit.quant.quantized_linear import QuantizedLinear, decode_once, from_stored, is_weight_encoding, stored_form
from vq4dit.tensor_checks import check_finite, tensor_digest

FORMAT = "vq4dit-checkpoint"
# 3: embedders equal to block 0's are stored once ("shared"); records name their tensors' dtypes
# 4: layers may carry input (activation) quantizers, the manifest attention-matmul quantizers
VERSION = 5  # 5: the manifest holds every stored tensor's sha256 (`tensor_sha256`), checked as each is read
READABLE_VERSIONS = (2, 3, 4, 5)
DIGESTS = "tensor_sha256"
MANIFEST, TENSORS = "manifest.json", "model.safetensors"
# model settings outside the architecture that change the model's function (class count and learned variance are
# architecture: arch.num_embeds_ada_norm, arch.out_channels)
FUNCTION_SETTINGS = ("timestep_shift", "guided_channels", "latent_scale")


def is_quantized_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / MANIFEST).exists()


def quantized_layers(model: ConditionalDiT) -> dict[str, QuantizedLinear]:
    return {n: m for n, m in model.transformer.named_modules() if isinstance(m, QuantizedLinear)}


@dataclass
class StoredState:
    """A transformer as it is written: tensors by name, each quantized layer's record, the shared embedders."""

    tensors: dict[str, torch.Tensor]
    layers: dict[str, dict]
    shared: dict[str, str]


def stored_state(transformer: torch.nn.Module) -> StoredState:
    layers = {n: m for n, m in transformer.named_modules() if isinstance(m, QuantizedLinear)}
    shared = shared_embedders(transformer)
    tensors, records = {}, {}
    for name, layer in layers.items():
        stored, record = stored_form(layer)
        tensors.update({f"{name}.{key}": t for key, t in stored.items()})
        encoding = sum(t.numel() * t.element_size() for key, t in stored.items() if is_weight_encoding(key))
        dtypes = {key: str(stored[key].dtype).removeprefix("torch.") for key in sorted(stored)}
        records[name] = {**record, "tensors": dtypes, "bits_per_weight": 8 * encoding / layer.num_weights}
    skipped = tuple(f"{alias}." for alias in shared)
    for name, tensor in transformer.state_dict().items():
        if owning_layer(name, layers) is None and not name.startswith(skipped):
            tensors[name] = tensor
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return StoredState(tensors, records, shared)


def save_quantized(model: ConditionalDiT, folder: Path, manifest: dict | None = None) -> Path:
    """Written into `<folder>.tmp` and renamed, so a crash never leaves a half checkpoint under the real name.
    `manifest["model"]` is the model config `load_quantized` rebuilds (default: the model's own architecture)."""
    folder = Path(folder)
    manifest = {"model": model.config_record(), **(manifest or {})}
    if folder.exists():
        raise UserError(f"{folder} already exists; earlier results are never overwritten")
    state = stored_state(model.transformer)
    manifest = {"format": FORMAT, "version": VERSION, **manifest, "layers": state.layers, "shared": state.shared,
                "sizes": size_report(state), DIGESTS: tensor_digests(state.tensors)}
    attention = attention_quantizer_record(model.transformer)
    if attention is not None:  # settings only: the processors hold no tensors
        manifest["attention_quantizers"] = attention
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_safetensors(state.tensors, tmp / TENSORS)
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, folder)
    return folder


def load_quantized(folder: Path, model_cfg: Mapping | None = None, *, decode: str = "per_forward",
                   dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> ConditionalDiT:
    """Rebuild the architecture without its weights and fill it from the file on `device`. The architecture is
    the manifest's model record, built by `load_dit` and nothing else (a record naming other code is refused, a VAE
    path in it is not opened); `model_cfg` (eval.py's model config, or any mapping of `load_dit`'s arguments) must
    agree with it in name and arch, and gives the VAE, guidance and timestep shift. `decode="per_forward"` keeps the
    codes and decodes each layer's weight in its forward; `"once"` makes every quantized layer a dense `nn.Linear`
    of `dtype` (default fp32). `dtype` also sets the dtype of every full-precision tensor and of the activations;
    codebooks and scales keep their own."""
    folder = Path(folder)
    if decode not in DECODE_MODES:
        raise UserError(f"decode={decode}; valid: {', '.join(DECODE_MODES)}")
    manifest = read_manifest(folder)
    stored = record_arguments(manifest.get("model"), f"{folder / MANIFEST}: model")
    if model_cfg is None:
        model = _empty_model({**stored, "vae": None}, folder)
    else:
        given = record_arguments(plain_config(model_cfg), "model")
        _check_same_model(folder, stored, given)
        model = _empty_model(given, folder)
    transformer = model.transformer
    share_embedders(transformer, manifest.get("shared", {}))
    digests = manifest_digests(manifest, folder)
    try:
        with TensorFile(folder / TENSORS, digests) as f:
            keys = set(f.keys())
            read = lambda key: f.get_tensor(key).to(device)  # noqa: E731
            for name, layer, used in read_layers(read, keys, manifest["layers"]):
                _check_layer_shape(transformer, name, layer, folder)
                replace_layer(transformer, name, _cast_bias(layer, dtype))
                keys -= used
            rest = {key: _cast(_finite(key, read(key)), dtype) for key in keys}
    except UserError:  # a refusal that names the tensor (a digest, a record): as it is
        raise
    except (SafetensorError, OSError, ValueError, KeyError) as e:
        raise UserError(f"cannot read {folder / TENSORS}: {e}") from None
    install_attention_quantizers(model.blocks, manifest.get("attention_quantizers"))
    unexpected = transformer.load_state_dict(rest, strict=False, assign=True).unexpected_keys
    missing = [n for n, t in [*transformer.named_parameters(), *transformer.named_buffers()] if t.is_meta]
    if missing or unexpected:
        raise UserError(f"checkpoint {folder} is incomplete or from another model: "
                        f"{(missing or unexpected)[0]} ({len(missing)} missing, {len(unexpected)} unexpected)")
    model = model.to(device).eval().requires_grad_(False)
    if decode == "once":
        decode_once(model.transformer, dtype or torch.float32)
    return model


def plain_config(cfg):
    """A caller's model config as plain data: an OmegaConf node (Hydra's) resolved into dicts, another mapping
    copied; anything else as it is, for `record_arguments` to refuse. omegaconf is never imported here: a node
    of it exists only when its caller has imported it."""
    omegaconf = sys.modules.get("omegaconf")
    if omegaconf is not None and isinstance(cfg, omegaconf.Container):
        return omegaconf.OmegaConf.to_container(cfg, resolve=True)
    return dict(cfg) if isinstance(cfg, Mapping) else cfg


def _check_same_model(folder: Path, stored: dict, given: dict) -> None:
    """The caller's model config must describe the checkpoint's architecture (arguments it leaves out take their
    defaults): say which values differ."""
    if stored["name"] != given["name"]:
        raise UserError(f"checkpoint {folder} holds a quantized {stored['name']}, not model={given['name']}; "
                        f"pass model={stored['name']}")
    ours, theirs = full_arch(given["arch"]), full_arch(stored["arch"])
    differ = [k for k in sorted(set(theirs) | set(ours)) if theirs.get(k) != ours.get(k)]
    if differ:
        raise UserError(f"checkpoint {folder} holds a quantized {stored['name']} with "
                        + ", ".join(f"arch.{k}={theirs.get(k)}" for k in differ)
                        + f", not model={given['name']}'s " + ", ".join(f"{ours.get(k)}" for k in differ)
                        + "; pass " + " ".join(f"model.arch.{k}={theirs.get(k)}" for k in differ))
    # the settings outside the architecture that change what the model computes, as it was calibrated
    for key in FUNCTION_SETTINGS:
        if key in stored and stored[key] != given.get(key):
            raise UserError(f"checkpoint {folder} was calibrated with model.{key}={_json(stored[key])}, the command "
                            f"gives model.{key}={_json(given.get(key))}; pass model.{key}={_json(stored[key])}")


def _json(value) -> str:
    return "null" if value is None else str(value)


def _empty_model(arguments: dict, folder: Path) -> ConditionalDiT:
    """`load_dit` (the one builder) on checked record fields, parameters on the meta device and no weights."""
    try:
        return load_dit(**{**arguments, "weights": None}, empty=True)
    except UserError:
        raise
    except (TypeError, ValueError, NotImplementedError, RuntimeError, ArithmeticError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"checkpoint {folder}: its model record builds no {arguments['name']}: {reason}") from None


class TensorFile:
    """Reads one tensor of a safetensors file at a time with plain file reads. safetensors' own reader maps the
    whole file, and every page it touched stays in the process's memory until the file is closed, so a load
    would peak at the file plus the model; here the peak is the model plus one tensor."""

    DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}

    def __init__(self, path: Path, digests: dict[str, str] | None = None):
        """`digests`: the sha256 (`tensor_digest`) of every tensor in the file, each checked as it is read (None:
        a checkpoint written before they were recorded)."""
        self.path, self.digests = Path(path), digests
        self.file = open(path, "rb")  # noqa: SIM115 (closed by __exit__)
        size = os.fstat(self.file.fileno()).st_size
        length = int.from_bytes(self.file.read(8), "little")
        if not 2 <= length <= size - 8:
            raise ValueError(f"its header claims {length} bytes in a file of {size}")
        self.header = json.loads(self.file.read(length))
        if not isinstance(self.header, dict):
            raise ValueError("its header is not a mapping of tensors")
        self.header.pop("__metadata__", None)
        self.start = 8 + length
        for key, entry in self.header.items():  # what a tensor claims, against the file, before any allocation
            self._check_entry(key, entry, size - self.start)

    def _check_entry(self, key: str, entry, data_bytes: int) -> None:
        try:
            (begin, end), dtype, shape = entry["data_offsets"], entry["dtype"], list(entry["shape"])
            width = torch.empty(0, dtype=self.DTYPES[dtype]).element_size()
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"tensor {key}'s header entry {entry!r} is not a safetensors entry") from None
        if not all(isinstance(n, int) and n >= 0 for n in (begin, end, *shape)):
            raise ValueError(f"tensor {key}'s header entry {entry!r} is not a safetensors entry")
        if not begin <= end <= data_bytes or end - begin != math.prod(shape) * width:
            raise ValueError(f"tensor {key} claims bytes {begin}..{end} of {dtype} {shape}; the file holds "
                             f"{data_bytes} bytes of tensor data")

    def __enter__(self) -> "TensorFile":
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()

    def keys(self) -> list[str]:
        return list(self.header)

    def get_tensor(self, key: str) -> torch.Tensor:
        entry = self.header[key]
        begin, end = entry["data_offsets"]
        out = torch.empty(end - begin, dtype=torch.uint8)
        self.file.seek(self.start + begin)
        if self.file.readinto(out.numpy()) != end - begin:
            raise ValueError(f"{key} is truncated")
        tensor = out.view(self.DTYPES[entry["dtype"]]).reshape(entry["shape"])
        if self.digests is not None:  # hashed in place, as read: the peak stays one tensor
            if key not in self.digests:
                raise UserError(f"{self.path} holds tensor {key}, which the manifest's {DIGESTS} does not list: "
                                "the file was changed after it was written")
            if tensor_digest(tensor) != self.digests[key]:
                raise UserError(f"{self.path}: tensor {key} does not match its sha256 in the manifest (the file is "
                                "damaged or was edited); re-copy or rewrite the checkpoint")
        return tensor


def read_layers(read, keys: set[str], records: dict[str, dict]):
    """(name, deployed layer, the keys it used) for every record, reading each layer's tensors with `read(key)`
    as it goes. A record lists its tensors (version 3); a version-2 record takes every key under its prefix."""
    for name, record in records.items():
        prefix = f"{name}."
        names = list(record.get("tensors") or []) or [k[len(prefix):] for k in keys
                                           if k.startswith(prefix) and "." not in k[len(prefix):]]
        absent = [n for n in names if prefix + n not in keys]
        if absent or not names:
            raise UserError(f"the quantized checkpoint has no {prefix}{absent[0] if absent else '*'} tensor")
        tensors = {n: _finite(prefix + n, read(prefix + n)) for n in names}  # a digest refuses here, by name
        try:
            _check_dtypes(tensors, record.get("tensors"))
            layer = from_stored(tensors, record)
        except (ValueError, KeyError, TypeError) as e:  # the manifest and the tensors disagree
            reason = f"its record lacks {e}" if isinstance(e, KeyError) else str(e)
            raise UserError(f"the quantized checkpoint's layer {name} ({record.get('type')!r}) is inconsistent: "
                            f"{reason}") from None
        yield name, layer, {prefix + n for n in names}


def _check_dtypes(tensors: dict[str, torch.Tensor], recorded) -> None:
    """A record (version 3 on) names each tensor's dtype: the file must hold that dtype."""
    if not isinstance(recorded, dict):
        return
    for key, tensor in tensors.items():
        dtype = str(tensor.dtype).removeprefix("torch.")
        if recorded.get(key) != dtype:
            raise ValueError(f"tensor {key} is {dtype}, its record says {recorded.get(key)}")


def tensor_digests(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """The manifest's `tensor_sha256`: every stored tensor's `tensor_digest`, by name."""
    return {name: tensor_digest(tensors[name]) for name in sorted(tensors)}


def manifest_digests(manifest: dict, folder: Path) -> dict[str, str] | None:
    """The digests a load checks; None only for a checkpoint written before they were recorded (version < 5)."""
    digests = manifest.get(DIGESTS)
    if digests is None and manifest.get("version", VERSION) < 5:
        return None
    if not isinstance(digests, dict) or not all(isinstance(v, str) for v in digests.values()):
        raise UserError(f"{Path(folder) / MANIFEST}: {DIGESTS}={str(digests)[:60]}; valid: a sha256 per stored "
                        f"tensor, as a version-{manifest.get('version')} checkpoint writes")
    return digests


def _finite(key: str, tensor: torch.Tensor) -> torch.Tensor:
    try:
        check_finite(key, tensor)
    except ValueError as e:
        raise UserError(f"the quantized checkpoint's {e}; it cannot give finite outputs") from None
    return tensor


def _check_layer_shape(transformer: torch.nn.Module, name: str, layer: QuantizedLinear, folder: Path) -> None:
    """A recorded layer must stand where the architecture has a linear of its shape."""
    try:
        there = transformer.get_submodule(name)
    except AttributeError:
        raise UserError(f"checkpoint {folder} records a layer {name} that this architecture lacks") from None
    shape = (getattr(there, "out_features", None), getattr(there, "in_features", None))
    if shape != (layer.out_features, layer.in_features):
        raise UserError(f"checkpoint {folder}: layer {name} is recorded as {layer.out_features}x{layer.in_features}, "
                        f"the architecture has {shape[0]}x{shape[1]} there")


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


def _cast_bias(layer: QuantizedLinear, dtype: torch.dtype | None) -> QuantizedLinear:
    if dtype is not None and layer.bias is not None:
        layer.bias.data = layer.bias.data.to(dtype)
    return layer


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
    if manifest.get("version") not in READABLE_VERSIONS:
        raise UserError(f"{Path(folder) / MANIFEST} is format version {manifest.get('version')}; this code reads "
                        f"versions {', '.join(map(str, READABLE_VERSIONS))} "
                        "(re-run train.py to rewrite the checkpoint)")
    return manifest


def size_report(state: StoredState) -> dict:
    """Bytes as stored, for the whole transformer and for the quantized linears, next to fp32 and fp16, and bits
    per weight. Parameters are counted once each (a shared embedder once), as the original DiT has them.
    `blocks_bits_per_weight`: codes + codebooks / scales / zeros of the quantized linears per weight, biases
    apart; `model_bits_per_weight`: every stored byte per parameter of the transformer."""
    tensors, layers = state.tensors, state.layers
    nbytes = lambda names: sum(tensors[n].numel() * tensors[n].element_size() for n in names)  # noqa: E731
    quantized = [n for n in tensors if n.rpartition(".")[0] in layers]  # the layers' own (not input quantizers')
    biases = [n for n in quantized if n.endswith(".bias")]
    weights = sum(r["shape"][0] * r["shape"][1] for r in layers.values())
    linear_params = weights + sum(tensors[n].numel() for n in biases)
    total_params = linear_params + sum(t.numel() for n, t in tensors.items() if n not in quantized)
    return {
        "model_bytes": nbytes(tensors), "model_fp32_bytes": 4 * total_params, "model_fp16_bytes": 2 * total_params,
        "model_params": total_params, "model_bits_per_weight": 8 * nbytes(tensors) / max(total_params, 1),
        "blocks_bytes": nbytes(quantized), "blocks_fp32_bytes": 4 * linear_params,
        "blocks_fp16_bytes": 2 * linear_params,
        "blocks_encoding_bytes": nbytes(quantized) - nbytes(biases),
        "blocks_bits_per_weight": 8 * (nbytes(quantized) - nbytes(biases)) / max(weights, 1),
        "shared_embedders": len(state.shared),
    }
