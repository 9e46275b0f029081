"""The real images' features that every eval run scores its samples against, kept on disk and keyed by content.

The digits protocol compares samples with two halves of the real digits (FID's reference side and the floor's
held-out half); the ImageNet protocol with the reference batch's 10k images (their pool features, for
precision/recall). Those features depend only on the images, the feature network and how it runs, never on the
model being scored, so they are computed once and kept in `logs/eval/cache/<name>-<key digest>.safetensors`.

The key is everything that determines them: a digest of the images (their bytes, not their path), of the feature
network's tensors and of its code and the extraction's code (the source files of their classes and functions), the
batch size, the device's kind, torch's version and this file's format. An entry is written under a temporary name
and renamed, and checked when read: the key in its header, then a digest of its tensors and that header. One that
fails (corrupt, edited, or made for another key) is never used: it is recomputed and replaced, with a warning.
A cache without a folder (eval.py's `reference_cache=false`) computes every time.
"""

import hashlib
import inspect
import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from vq4dit.files import save_safetensors
from vq4dit.tensor_checks import tensor_digest

log = logging.getLogger(__name__)
Tensors = dict[str, torch.Tensor]


class ReferenceCache:
    FORMAT = 1

    def __init__(self, folder: Path | str | None):
        """`folder`: where entries live; None computes every time (and stores nothing)."""
        self.folder = None if folder is None else Path(folder)
        self.report: list[dict] = []  # one row per request: what it was, where it came from, its seconds

    def features(self, name: str, key: Callable[[], dict], compute: Callable[[], Tensors]) -> Tensors:
        """`compute()`'s tensors (on the CPU), from the valid entry of `key()` when there is one, else computed
        (and stored when the cache has a folder). `key` is called only when the cache has a folder."""
        start = time.perf_counter()
        if self.folder is None:
            tensors, source = _on_cpu(compute()), "computed (reference_cache=false)"
        else:
            keyed = {**key(), "cache_format": self.FORMAT}
            text = json.dumps(keyed, sort_keys=True, default=str)
            path = self.folder / f"{name}-{hashlib.sha256(text.encode()).hexdigest()[:16]}.safetensors"
            tensors = self._load(path, text)
            source = f"loaded from {path}"
            if tensors is None:
                tensors = _on_cpu(compute())
                self._store(path, text, tensors)
                source = f"computed, cached in {path}"
        self.report.append({"name": name, "source": source, "seconds": time.perf_counter() - start})
        log.info("%s: %s", name, source)
        return tensors

    def _load(self, path: Path, key: str) -> Tensors | None:
        if not path.exists():
            return None
        try:
            with safe_open(path, "pt") as f:
                header = f.metadata() or {}
            if header.get("key") != key:
                raise ValueError("it was written for another key")
            tensors = load_file(path)
            if header.get("digest") != entry_digest(tensors, key):
                raise ValueError("its tensors or key do not match their digest (corrupt or edited)")
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            log.warning("reference cache entry %s is unusable (%s): recomputing it", path, reason)
            return None
        return tensors

    def _store(self, path: Path, key: str, tensors: Tensors) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # two runs filling one entry never share a file
        save_safetensors(tensors, tmp, metadata={"key": key, "digest": entry_digest(tensors, key)})
        os.replace(tmp, path)


def extraction_key(network: nn.Module, batch_size: int, device: torch.device, code: Iterable) -> dict:
    """The key's part that says how features are extracted: the network (tensors and code), the extraction's
    `code` (the functions that batch the images and call the network), the batch size, the device and torch."""
    return {"network": network_digest(network), "code": code_digest(code), "batch_size": batch_size,
            "device": device_kind(device), "torch": torch.__version__}


def entry_digest(tensors: Tensors, key: str) -> str:
    """sha256 of an entry's key and its tensors (names, dtypes, shapes and bytes): what its header records."""
    h = hashlib.sha256(key.encode())
    for name in sorted(tensors):
        h.update(f";{name}:{tensor_digest(tensors[name])}".encode())
    return h.hexdigest()


def tensors_digest(tensors: Tensors) -> str:
    """sha256 over named tensors' dtypes, shapes and bytes."""
    return hashlib.sha256(";".join(f"{n}:{tensor_digest(t)}" for n, t in sorted(tensors.items())).encode()).hexdigest()


def network_digest(network: nn.Module) -> str:
    """sha256 of a network's tensors (parameters and buffers) and of the source files of every class in it."""
    return hashlib.sha256(f"{tensors_digest(network.state_dict())};"
                          f"{code_digest(type(m) for m in network.modules())}".encode()).hexdigest()


def code_digest(objects: Iterable) -> str:
    """sha256 of the contents of the source files that define classes and functions (each file once); a built-in
    stands for itself by its name."""
    files, names = set(), set()
    for obj in objects:
        try:
            files.add(inspect.getsourcefile(obj) or "")
        except TypeError:  # a built-in
            names.add(f"{obj.__module__}.{obj.__qualname__}")
    files.discard("")
    contents = sorted(file_digest(f) for f in files)  # not their paths: a moved clone has the same code
    return hashlib.sha256(json.dumps({"files": contents, "names": sorted(names)}).encode()).hexdigest()


def file_digest(path: Path | str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def device_kind(device: torch.device) -> str:
    """What of the device can change the features' bits: its type and, for a GPU, its model."""
    return f"cuda:{torch.cuda.get_device_name(device)}" if device.type == "cuda" else device.type


def _on_cpu(tensors: Tensors) -> Tensors:
    return {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
