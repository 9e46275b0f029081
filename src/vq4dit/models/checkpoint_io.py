"""Reading full-precision DiT weights: the original `.pt` state dict or a diffusers folder / safetensors file.

Only tensors are read (`weights_only=True`, safetensors); every failure is one line naming the file. The model is
built without weights (meta device) and takes the file's tensors as its own, so loading peaks at the model's size,
not twice it (benchmarks/load_memory.py).
"""

import json
import pickle
import zipfile
from pathlib import Path

import torch
from diffusers import DiTTransformer2DModel
from safetensors import SafetensorError
from safetensors.torch import load_file

from vq4dit.errors import UserError
from vq4dit.files import as_umask_allows
from vq4dit.models.original_format import from_original, is_original_state_dict
from vq4dit.tensor_checks import check_finite

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_TORCH_WEIGHTS = "diffusion_pytorch_model.bin"


def load_transformer_weights(transformer: DiTTransformer2DModel, path: Path, name: str) -> None:
    state = read_state_dict(path)
    found, expected = architecture_of(state), _architecture(transformer)
    if found is not None and found != expected:  # another DiT size: say which, not a first missing key
        text = lambda a: ", ".join(f"{k} {v}" for k, v in a.items())  # noqa: E731
        raise UserError(f"checkpoint {path} holds a DiT of {text(found)}; model={name} has {text(expected)}: "
                        "choose the model config of the checkpoint's size")
    if is_original_state_dict(state):
        _check_pos_embed(transformer, state, path)
        try:
            state = from_original(state, transformer.config.num_layers)
        except KeyError as e:
            raise UserError(f"checkpoint {path} does not match model {name}: {e.args[0]}") from None
    _load_strict(transformer, state, path, name)


def architecture_of(state: dict[str, torch.Tensor]) -> dict | None:
    """(depth, width, patch) of a DiT state dict in the original or diffusers layout; None if it is neither."""
    layouts = (("blocks.", "x_embedder.proj.weight"), ("transformer_blocks.", "pos_embed.proj.weight"))
    for blocks, patch_embed in layouts:
        if patch_embed in state:
            depth = len({k.split(".")[1] for k in state if k.startswith(blocks)})
            weight = state[patch_embed]
            return {"depth": depth, "width": weight.shape[0], "patch": weight.shape[-1]}
    return None


def _architecture(transformer: DiTTransformer2DModel) -> dict:
    c = transformer.config
    return {"depth": c.num_layers, "width": c.num_attention_heads * c.attention_head_dim, "patch": c.patch_size}


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise UserError(f"checkpoint not found: {path}")
    if path.is_dir():
        return _read_diffusers_folder(path)
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    return _read_torch_file(path)


def _read_torch_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(f"checkpoint {path} holds Python objects besides tensors, which are not unpickled; "
                        "re-save only its state dict, e.g. torch.save(ckpt['ema'], 'weights.pt')") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"cannot read checkpoint {path}: truncated or corrupt ({reason})") from None
    # DiT's own training checkpoints wrap the weights; the EMA copy is the one to sample from.
    if isinstance(state, dict) and isinstance(state.get("ema"), dict):
        state = state["ema"]
    elif isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"checkpoint {path} is not a state dict of tensors")
    return state


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise UserError(f"cannot read checkpoint {path}: truncated or corrupt ({e})") from None


def _read_diffusers_folder(path: Path) -> dict[str, torch.Tensor]:
    """A transformer folder, or a pipeline folder (facebook/DiT-XL-2-256) holding one under transformer/."""
    for folder in (path, path / "transformer"):
        if (folder / DIFFUSERS_WEIGHTS).exists():
            return _read_safetensors(folder / DIFFUSERS_WEIGHTS)
        if (folder / DIFFUSERS_TORCH_WEIGHTS).exists():  # older folders: a torch.save'd state dict
            return _read_torch_file(folder / DIFFUSERS_TORCH_WEIGHTS)
    raise UserError(f"checkpoint folder {path} holds no {DIFFUSERS_WEIGHTS} or {DIFFUSERS_TORCH_WEIGHTS} "
                    f"(nor under transformer/)")


def _load_strict(transformer: DiTTransformer2DModel, state: dict, path: Path, name: str) -> None:
    expected = transformer.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        first = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise UserError(f"checkpoint {path} does not match model {name}: {first} "
                        f"({len(missing)} missing, {len(unexpected)} unexpected keys)")
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise UserError(f"checkpoint {path} does not match model {name}: {key} has shape "
                            f"{tuple(tensor.shape)}, the model expects {tuple(expected[key].shape)}")
        try:
            check_finite(key, tensor)  # NaN/Inf weights would quantize and sample into NaN without a word
        except ValueError as e:
            raise UserError(f"checkpoint {path}: {e}; refusing non-finite weights") from None
    transformer.load_state_dict(owned_tensors(state, expected), assign=True)


def owned_tensors(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` emptied into tensors the model can take as its own (`load_state_dict(assign=True)`: no second copy
    of the model), each in its expected dtype and with its own storage: a view (the original's fused qkv cut in
    three) or a tensor met before (its one embedder, named in every block) is copied, and a tensor read from the
    file is let go as soon as it is placed, so the peak is the model plus one such tensor."""
    owned, storages = {}, set()
    for key in list(state):
        tensor = state.pop(key).to(expected[key].dtype)
        storage = tensor.untyped_storage()
        if storage.data_ptr() in storages or storage.nbytes() != tensor.numel() * tensor.element_size():
            tensor = tensor.clone()
        storages.add(tensor.untyped_storage().data_ptr())
        owned[key] = tensor
    return owned


def _check_pos_embed(transformer: DiTTransformer2DModel, state: dict, path: Path) -> None:
    """The original stores its fixed sin-cos table; a mismatch means another resolution or patch size."""
    stored = state.get("pos_embed")
    ours = transformer.pos_embed.pos_embed
    if stored is None or stored.shape[-1] != ours.shape[-1]:
        return  # absent, or another hidden size: the weights' shape check names that more precisely
    if stored.shape != ours.shape or not torch.allclose(stored.float(), ours.float(), atol=1e-4):
        raise UserError(f"checkpoint {path} was made for another resolution: pos_embed {tuple(stored.shape)} "
                        f"does not match this model's {tuple(ours.shape)} table "
                        f"(sample_size={transformer.config.sample_size}, patch_size={transformer.config.patch_size})")


def save_diffusers_folder(transformer: DiTTransformer2DModel, folder: Path, extra: dict) -> None:
    """diffusers' own folder format plus our metadata (`vq4dit.json`), written to a temporary name then renamed."""
    tmp = folder.with_name(folder.name + ".tmp")
    transformer.save_pretrained(tmp, safe_serialization=True)
    as_umask_allows(tmp)  # safetensors writes owner-only files
    (tmp / "vq4dit.json").write_text(json.dumps(extra, indent=2))
    if folder.exists():
        raise UserError(f"{folder} already exists; move it away first (earlier results are never overwritten)")
    tmp.rename(folder)
