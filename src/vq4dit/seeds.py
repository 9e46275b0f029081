"""Independent random streams derived from one user seed.

Calibration trajectories, held-out trajectories, the pool's row subset and evaluation noise all come from the
same `seed=` setting, but each purpose hashes it with its own name, so no two purposes ever start from the same
generator state: evaluation never re-samples the noise that calibration saw.
"""

import hashlib

import torch


def stream_seed(seed: int, purpose: str) -> int:
    """A 63-bit seed for `purpose`, a pure function of (seed, purpose)."""
    digest = hashlib.sha256(f"{purpose}:{int(seed)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def generator(seed: int, purpose: str) -> torch.Generator:
    """A CPU generator (same draws on every device) for `purpose`."""
    return torch.Generator().manual_seed(stream_seed(seed, purpose))
