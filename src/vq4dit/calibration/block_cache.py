"""Finished blocks on disk, so an interrupted run resumes at the first unfinished block (AQLM-style).

`block_NNN.safetensors` holds every deployed layer of block NNN in its checkpoint form (`QuantizedLinear.stored`)
and, in its header, the layers' records, the block's statistics, the cache's key, the record of the method that
made it (name, preset, settings: `Method.record()`) and a digest of its tensors and of that header. A file is
written under a temporary name and renamed, so a crash never leaves half a block under the real name.
Every block is verified when it is read: the key of the cache it was written for, the method record against the
running method's, the digest, each layer against its record and against the block's own linears (names and
shapes), and the layers against what the running method deploys (`Method.check_deployed`: a vq4dit run never
resumes `UniformLinear` layers). A block that fails is refused with one line that says to rerun with
`resume=false`; it is never mixed into a checkpoint. Refused, not recomputed: a block that fails was damaged,
edited or put there from another run, and a silent recompute would hide that (and overwrite the evidence), while
`resume=false` recomputes every block into a fresh folder anyway.
"""

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from vq4dit.errors import UserError
from vq4dit.files import save_safetensors
from vq4dit.quant.quantized_linear import QuantizedLinear, from_stored, stored_form

if TYPE_CHECKING:
    from vq4dit.methods.base import Method

SIGNED = ("key", "method", "layers", "stats")  # the header fields the digest covers, with the tensors


class BlockCache:
    FORMAT = 3  # 2: blocks carry the cache key and a digest of their tensors; 3: the method's record, the digest
    # covers the header too

    def __init__(self, folder: Path, key: str = ""):
        self.folder, self.key = Path(folder), key
        self.folder.mkdir(parents=True, exist_ok=True)

    def path(self, index: int) -> Path:
        return self.folder / f"block_{index:03d}.safetensors"

    def save(self, index: int, layers: dict[str, QuantizedLinear], stats: dict, method: "Method | None" = None
             ) -> None:
        """`method`: the one that made the block (its record goes into the header; the pipeline always gives it)."""
        tensors, records = {}, {}
        for name, layer in layers.items():
            stored, records[name] = stored_form(layer)
            tensors.update({f"{name}.{key}": t.detach().contiguous().cpu() for key, t in stored.items()})
        path = self.path(index)
        tmp = path.with_name(path.name + ".tmp")
        header = {"layers": json.dumps(records), "stats": json.dumps(stats), "key": self.key,
                  "method": method_record(method)}
        save_safetensors(tensors, tmp, metadata={**header, "digest": block_digest(tensors, header)})
        os.replace(tmp, path)

    def load(self, index: int, linears: dict[str, torch.nn.Module] | None = None, method: "Method | None" = None
             ) -> tuple[dict[str, QuantizedLinear], dict] | None:
        """The cached block `index`, verified (against `linears`, the block's own layers, and `method`, the running
        one, when given); None if it was not cached."""
        path = self.path(index)
        if not path.exists():
            return None
        try:
            tensors = load_file(path)
            with safe_open(path, "pt") as f:
                header = f.metadata() or {}
            if header.get("key", "") != self.key:
                raise ValueError(f"written for another run (key {header.get('key')!r}, this run's {self.key!r})")
            if method is not None and header.get("method") != method_record(method):
                raise ValueError(made_by(header.get("method"), method))
            if header.get("digest") != block_digest(tensors, header):
                raise ValueError("its tensors or header do not match their digest (corrupt or edited)")
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
            if method is not None:  # even under a matching record: the layers must be what this method deploys
                method.check_deployed(layers)
        except (SafetensorError, OSError, KeyError, ValueError, TypeError, RuntimeError) as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UserError(f"cached block {path} is unusable ({reason}); rerun with resume=false") from None
        return layers, stats


def method_record(method: "Method | None") -> str:
    """The method's record as the header holds it (canonical JSON); "" without a method."""
    return "" if method is None else json.dumps(method.record(), sort_keys=True, default=str)


def made_by(stored: str | None, method: "Method") -> str:
    """Why a block's method record is not the running method's: the first field that differs."""
    try:
        theirs = json.loads(stored) if stored else {}
    except json.JSONDecodeError:
        theirs = {}
    ours = json.loads(method_record(method))
    if not isinstance(theirs, dict) or not theirs:
        return f"it carries no method record (this run: method={method.name}); made by an older vq4dit or edited"
    order = ["name", "quant", "act", *sorted(set(theirs) | set(ours))]
    key = next((k for k in order if theirs.get(k) != ours.get(k)), "name")
    if key == "name":
        return f"made by method={theirs.get('name')}, this run is method={ours['name']}"
    named = lambda v: v.get("name", v) if isinstance(v, dict) else v  # noqa: E731 (a preset by its name)
    return (f"made by method={theirs.get('name')} with {key}={named(theirs.get(key))}, this run's "
            f"{key}={named(ours.get(key))}")


def block_digest(tensors: dict[str, torch.Tensor], header: dict[str, str]) -> str:
    """sha256 over the tensors (`tensors_digest`) and the header fields that say what they are (`SIGNED`)."""
    signed = json.dumps({key: header.get(key, "") for key in SIGNED}, sort_keys=True)
    return hashlib.sha256(f"{tensors_digest(tensors)};{signed}".encode()).hexdigest()


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors' names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
