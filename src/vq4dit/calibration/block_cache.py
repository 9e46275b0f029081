"""Finished blocks on disk, so an interrupted run resumes at the first unfinished block (AQLM-style).

`block_NNN.safetensors` holds every deployed layer of block NNN in its checkpoint form (`QuantizedLinear.stored`)
and, in its header, the layers' records and the block's statistics. A file is written under a temporary name and
renamed, so a crash never leaves half a block under the real name.
"""

import json
import os
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from vq4dit.errors import UserError
from vq4dit.quant.quantized_linear import QuantizedLinear, from_stored, stored_form


class BlockCache:
    def __init__(self, folder: Path):
        self.folder = Path(folder)
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
        save_file(tensors, tmp, metadata={"layers": json.dumps(records), "stats": json.dumps(stats)})
        os.replace(tmp, path)

    def load(self, index: int) -> tuple[dict[str, QuantizedLinear], dict] | None:
        path = self.path(index)
        if not path.exists():
            return None
        try:
            tensors = load_file(path)
            with safe_open(path, "pt") as f:
                header = f.metadata()
            records, stats = json.loads(header["layers"]), json.loads(header["stats"])
            layers = {}
            for name, record in records.items():
                prefix = f"{name}."
                own = {key[len(prefix):]: t for key, t in tensors.items() if key.startswith(prefix)}
                layers[name] = from_stored(own, record)
        except (SafetensorError, OSError, KeyError, ValueError, TypeError, RuntimeError) as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UserError(f"cached block {path} is unreadable ({reason}); rerun with resume=false") from None
        return layers, stats

