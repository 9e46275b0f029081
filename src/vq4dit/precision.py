"""Compute precision, shared by sampling and calibration: fp32, or bf16 / fp16 autocast.

Under bf16 or fp16 the model's matmuls run in that dtype (`torch.autocast`) while every parameter stays fp32: a
calibrated student keeps fp32 master weights, optimizer states and loss (Lightning's "bf16-mixed" / "16-mixed").
"""

import contextlib

import torch

from vq4dit.errors import UserError

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
LIGHTNING = {"fp32": "32-true", "bf16": "bf16-mixed", "fp16": "16-mixed"}  # Trainer(precision=...) for a fit


def check_precision(precision: str, key: str = "precision") -> str:
    if precision not in PRECISIONS:
        raise UserError(f"{key}={precision}; valid: {', '.join(PRECISIONS)}")
    return precision


def autocast(device: torch.device | str, precision: str) -> contextlib.AbstractContextManager:
    """The autocast context of `precision` on `device` (a no-op for fp32)."""
    dtype = PRECISIONS[check_precision(precision)]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)
