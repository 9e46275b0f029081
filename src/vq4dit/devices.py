"""Which device a job runs on: `device=cpu`, `cuda`, `cuda:1` (one device) and `devices=N` or `[1, 3]` (blocks
spread over several). Everything a job touches goes to `torch.device(device)`; Lightning gets the same device as
its accelerator and device list. A device this machine does not have is refused in one line, before any work."""

import os

import torch

from vq4dit.errors import UserError


def available_devices() -> list[str]:
    names = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        names.append("mps")
    return names


def resolve_device(spec: str | torch.device, key: str = "device") -> torch.device:
    """`spec` as a torch.device that exists here; a one-line UserError naming what is available otherwise."""
    device = _parse(spec, key)
    available = available_devices()
    if device.type == "cuda":
        ok = torch.cuda.is_available() and (device.index is None or device.index < torch.cuda.device_count())
    else:
        ok = device.type in {torch.device(name).type for name in available}
    if not ok:
        raise UserError(f"{key}={spec} is not available on this machine; available: {', '.join(available)}")
    return device


def resolve_devices(spec: str | torch.device, devices: int | list[int] | tuple[int, ...] = 1) -> list[torch.device]:
    """The devices blocks are spread over: `devices` processes on `spec`'s device type. An int N means cuda:0 ..
    cuda:N-1 (N CPU processes on `cpu`), a list names CUDA indices; a single device keeps `spec` as given."""
    device = _parse(spec, "device")
    if isinstance(devices, int) and not isinstance(devices, bool):
        if devices < 1:
            raise UserError(f"devices={devices}; valid: a positive number of devices or a list of CUDA indices")
        if devices == 1:
            return [resolve_device(spec)]
        if device.index is not None:
            raise UserError(f"device={spec} names one device but devices={devices}; give device={device.type} "
                            f"devices={devices} (or devices=[i, j, ...] to choose them)")
        cores = os.cpu_count() or 1
        if device.type == "cpu" and devices > cores:  # each is a process calibrating blocks: at most one a core
            raise UserError(f"devices={devices} CPU processes on a machine with {cores} cores; valid: 1..{cores}")
        names = [device.type] * devices if device.type == "cpu" else [f"{device.type}:{i}" for i in range(devices)]
    else:
        indices = list(devices)
        if device.type != "cuda" or not indices or device.index is not None or len(set(indices)) != len(indices):
            raise UserError(f"devices={indices} with device={spec}; valid: device=cuda with distinct CUDA indices")
        names = [f"cuda:{i}" for i in indices]
    return [resolve_device(name, "devices") for name in names]


def fits_on(device: torch.device, nbytes: int) -> bool | None:
    """Whether `nbytes` take at most half of a CUDA device's free memory (None for other devices)."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes <= free // 2


def _parse(spec: str | torch.device, key: str) -> torch.device:
    try:
        return torch.device(spec)
    except (RuntimeError, TypeError):
        raise UserError(f"{key}={spec} is not a device name; valid: cpu, cuda, cuda:<index>, mps") from None


def lightning_accelerator(device: torch.device) -> tuple[str, list[int] | int]:
    """(accelerator, devices) for a Lightning Trainer or Fabric running on exactly `device`."""
    accelerator = "gpu" if device.type == "cuda" else device.type
    return accelerator, [device.index] if device.index is not None else 1
