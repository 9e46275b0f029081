"""Finished blocks on disk, so an interrupted run resumes at the first unfinished block (AQLM-style).

`block_NNN.safetensors` holds every deployed layer of block NNN in its checkpoint form (`QuantizedLinear.stored`)
and, in its header, the layers' records, the block's statistics, the cache's key and a digest of its tensors. A
file is written under a temporary name and renamed, so a crash never leaves half a block under the real name.
Every block is verified when it is read: the digest of its tensors, the key of the cache it was written for, and
each layer against its record and against the block's own linears (names and shapes). A block that fails is
refused with one line that says to rerun with `resume=false`; it is never mixed into a checkpoint.
"""

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from vq4dit.errors import UserError
from vq4dit.quant.quantized_linear import QuantizedLinear, from_stored, stored_form


class BlockCache:
    FORMAT = 2  # 2: blocks carry the cache key and a digest of their tensors

    def __init__(self, folder: Path, key: str = ""):
        self.folder, self.key = Path(folder), key
        self.folder.mkdir(parents=True, exist_ok=True)

    def path(self, index: int) -> Path:
        return self.folder / f"block_{index:03d}.safetensors"

    def save(self, index: int, layers: dict[str, QuantizedLinear], stats: dict) -> None:
        tensors, records = {}, {}
        for name, layer in layers.items():
            stored, records[name] = stored_form(layer)
            tensors.update({f"{name}.{key}": t.detach().contiguous().cpu() for key, t in stored.items()})
        path = self.path(index)
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, tmp, metadata={"layers": json.dumps(records), "stats": json.dumps(stats),
                                          "key": self.key, "digest": tensors_digest(tensors)})
        os.replace(tmp, path)

    def load(self, index: int, linears: dict[str, torch.nn.Module] | None = None
             ) -> tuple[dict[str, QuantizedLinear], dict] | None:
        """The cached block `index`, verified (against `linears`, the block's own layers, when given); None if it
        was not cached."""
        path = self.path(index)
        if not path.exists():
            return None
        try:
            tensors = load_file(path)
            with safe_open(path, "pt") as f:
                header = f.metadata() or {}
            if header.get("key", "") != self.key:
                raise ValueError(f"written for another run (key {header.get('key')!r}, this run's {self.key!r})")
            if header.get("digest") != tensors_digest(tensors):
                raise ValueError("its tensors do not match their digest (corrupt or edited)")
            records, stats = json.loads(header["layers"]), json.loads(header["stats"])
            if linears is not None and set(records) != set(linears):
                raise ValueError(f"it holds layers {sorted(records)}, the block has {sorted(linears)}")
            layers = {}
            for name, record in records.items():
                prefix = f"{name}."
                own = {key[len(prefix):]: t for key, t in tensors.items() if key.startswith(prefix)}
                layers[name] = from_stored(own, record)
                if linears is not None:
                    want = (linears[name].out_features, linears[name].in_features)
                    if (layers[name].out_features, layers[name].in_features) != want:
                        raise ValueError(f"layer {name} is {layers[name].out_features}x{layers[name].in_features}, "
                                         f"the block's is {want[0]}x{want[1]}")
        except (SafetensorError, OSError, KeyError, ValueError, TypeError, RuntimeError) as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UserError(f"cached block {path} is unusable ({reason}); rerun with resume=false") from None
        return layers, stats


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors' names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
