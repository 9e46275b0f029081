"""Checks of stored tensors against their record, shared by every layer type's `from_stored` and every loader
(full-precision weights, quantized checkpoints, cached blocks): a file whose manifest and tensors disagree, or
whose weights are not finite, is refused with a line naming the tensor, never loaded as garbage.

A leaf (torch only), so the model readers below the quantized layers use the same checks."""

import hashlib
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
        needs = f"{str(dtype).removeprefix('torch.')} {tuple(shape)}" if dtype else f"{tuple(shape)}"
        raise ValueError(f"tensor {name} is {str(tensor.dtype).removeprefix('torch.')} {tuple(tensor.shape)}, its "
                         f"record needs {needs}")


def check_packed(name: str, packed: torch.Tensor, count: int, bits: int) -> None:
    check_shape(name, packed, (math.ceil(count * bits / 8),), torch.uint8)


def check_codes_below(name: str, codes: torch.Tensor, limit: int) -> None:
    if codes.numel() and int(codes.max()) >= limit:
        raise ValueError(f"tensor {name} holds code {int(codes.max())}, its record allows 0..{limit - 1}")


def check_bias(tensors: dict[str, torch.Tensor], out_features: int) -> None:
    if "bias" in tensors:
        check_shape("bias", tensors["bias"], (out_features,))
        check_floating("bias", tensors["bias"])


def check_only(tensors: dict[str, torch.Tensor], used: set[str], prefix: str = "") -> None:
    """A layer stores no tensor its record does not use: one would be a sign of a record of another kind of layer
    (an asymmetric layer's zero points under a symmetric record), silently ignored otherwise."""
    extra = sorted(set(tensors) - used)
    if extra:
        valid = ", ".join(prefix + name for name in sorted(used)) or "none"
        raise ValueError(f"it stores tensor {prefix}{extra[0]} that its record does not use (valid: {valid})")


def check_floating(name: str, tensor: torch.Tensor) -> None:
    """Codebooks, scales and biases are floating point (a loader may cast them to another float dtype)."""
    if not tensor.is_floating_point():
        raise ValueError(f"tensor {name} is {str(tensor.dtype).removeprefix('torch.')}, its record needs a "
                         "floating-point tensor")


def check_positive(name: str, tensor: torch.Tensor) -> None:
    """Weight scales are positive (a zero or negative scale decodes every code of its group wrongly)."""
    bad = int((tensor <= 0).sum()) if tensor.numel() else 0
    if bad:
        raise ValueError(f"tensor {name} holds {bad} scale{'s' * (bad > 1)} <= 0 of {tensor.numel()}; "
                         "valid: positive scales")


def check_integral(name: str, tensor: torch.Tensor) -> None:
    """Zero points are integers: a fractional one puts no code on zero and shifts every weight of its group."""
    if tensor.numel() and not bool((tensor == tensor.round()).all()):
        raise ValueError(f"tensor {name} holds non-integer zero points; valid: integers")


def check_codes_at_most(name: str, codes: torch.Tensor, high: int) -> None:
    check_codes_below(name, codes, high + 1)


def record_int(record: dict, key: str, low: int, high: int | None = None) -> int:
    """An integer field of a layer record, in [low, high]: a float, string or bool there is a damaged record."""
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        valid = f"an integer in {low}..{high}" if high is not None else f"an integer >= {low}"
        raise ValueError(f"record {key}={value!r}; valid: {valid}")
    return value


def record_bool(record: dict, key: str) -> bool:
    value = record[key]
    if not isinstance(value, bool):
        raise ValueError(f"record {key}={value!r}; valid: true or false")
    return value


def tensor_digest(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes, hashed in place (no copy of a contiguous CPU tensor): what a
    checkpoint records of each stored tensor and checks as it reads it back."""
    t = tensor.detach().contiguous().cpu()
    h = hashlib.sha256(f"{str(t.dtype).removeprefix('torch.')}:{tuple(t.shape)};".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def check_all_finite(tensors: dict[str, torch.Tensor]) -> None:
    for key, tensor in tensors.items():
        check_finite(key, tensor)
