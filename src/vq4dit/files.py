"""Files as the user's umask says. safetensors writes through a private temporary file, so what it saves is
owner-only (0600) whatever the umask; every file this project writes with it is given the mode an ordinary
`open` would have given it."""

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

_UMASK = os.umask(0)  # read once (setting it is the only way to read it), then put back at once
os.umask(_UMASK)


def as_umask_allows(path: Path | str) -> None:
    """`path` (a file, or every file under a folder) gets mode 0666 less the umask."""
    path = Path(path)
    for file in [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]:
        os.chmod(file, 0o666 & ~_UMASK)


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path | str, metadata: dict | None = None) -> None:
    save_file(tensors, path, metadata=metadata)
    as_umask_allows(path)
