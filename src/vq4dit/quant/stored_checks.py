"""Checks of stored tensors against their record, shared by every layer type's `from_stored` and every loader:
a checkpoint or cached block whose manifest and tensors disagree, or whose weights are not finite, is refused
with a line naming the tensor, never loaded as garbage."""

import math

import torch


def check_finite(name: str, tensor: torch.Tensor, chunk: int = 1 << 16) -> None:
    """NaN or Inf in a floating-point tensor (weights, codebooks, scales, biases) is refused, naming it. Checked
    a chunk at a time, so a load's memory peak never holds a mask of a whole tensor."""
    parts = tensor.reshape(-1).split(chunk) if tensor.is_floating_point() else ()
    if not all(bool(torch.isfinite(part).all()) for part in parts):
        bad = int((~torch.isfinite(tensor)).sum())
        raise ValueError(f"tensor {name} holds {bad} NaN/Inf value{'s' * (bad > 1)} of {tensor.numel()}")


def check_shape(name: str, tensor: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype | None = None) -> None:
    if tuple(tensor.shape) != tuple(shape) or (dtype is not None and tensor.dtype != dtype):
        raise ValueError(f"tensor {name} is {str(tensor.dtype).removeprefix('torch.')} {tuple(tensor.shape)}, its "
                         f"record needs {str(dtype).removeprefix('torch.') if dtype else ''} {tuple(shape)}".replace("  ", " "))


def check_packed(name: str, packed: torch.Tensor, count: int, bits: int) -> None:
    check_shape(name, packed, (math.ceil(count * bits / 8),), torch.uint8)


def check_codes_below(name: str, codes: torch.Tensor, limit: int) -> None:
    if codes.numel() and int(codes.max()) >= limit:
        raise ValueError(f"tensor {name} holds code {int(codes.max())}, its record allows 0..{limit - 1}")


def check_bias(tensors: dict[str, torch.Tensor], out_features: int) -> None:
    if "bias" in tensors:
        check_shape("bias", tensors["bias"], (out_features,))


def check_all_finite(tensors: dict[str, torch.Tensor]) -> None:
    for key, tensor in tensors.items():
        check_finite(key, tensor)
