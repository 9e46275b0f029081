"""The `.npz` files of the ADM evaluator (guided-diffusion `evaluations/evaluator.py`), read and written in batches.

A sample batch holds `arr_0`, uint8 images N x H x W x 3 (and here `arr_1`, the class labels); the reference batch
(`VIRTUAL_imagenet256_labeled.npz`) holds `arr_0` (10k real images) and the dataset statistics the papers' FIDs
use: `mu`/`sigma` of Inception pool_3 features and `mu_s`/`sigma_s` of the spatial features. 50k samples at
256 px are 9.8 GB of uint8, so arrays stream through a zip member batch by batch and never sit in memory whole.
"""

import os
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vq4dit.errors import UserError

STATISTICS = ("mu", "sigma", "mu_s", "sigma_s")
READ_HEADER = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


class NpzArrayReader:
    """One array of an `.npz` read in batches of its first axis (the file must stay open: use `open_npz_array`)."""

    def __init__(self, member, shape: tuple[int, ...], dtype: np.dtype):
        self.member, self.shape, self.dtype = member, shape, dtype
        self.row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        self.position = 0

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, count: int) -> np.ndarray:
        """The next `count` rows (fewer at the end of the array)."""
        count = min(count, self.shape[0] - self.position)
        data = self.member.read(count * self.row_bytes)
        if len(data) != count * self.row_bytes:
            raise UserError(f"npz array ends after {self.position} of {self.shape[0]} rows: the file is truncated")
        self.position += count
        return np.frombuffer(data, dtype=self.dtype).reshape(count, *self.shape[1:])

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        while self.position < self.shape[0]:
            yield self.read(batch_size)


@contextmanager
def open_npz_array(path: Path, name: str = "arr_0") -> Iterator[NpzArrayReader]:
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as e:
        raise UserError(f"cannot read {path} as an .npz file ({e})") from None
    with archive:
        if f"{name}.npy" not in archive.namelist():
            keys = ", ".join(sorted(n.removesuffix(".npy") for n in archive.namelist())) or "nothing"
            raise UserError(f"{path} holds no {name} (it holds {keys})")
        with archive.open(f"{name}.npy") as member:
            version = np.lib.format.read_magic(member)
            if version not in READ_HEADER:
                raise UserError(f"{path}: {name} is in .npy format {version}; readable: 1.0 and 2.0")
            shape, fortran_order, dtype = READ_HEADER[version](member)
            if fortran_order or dtype.hasobject:
                raise UserError(f"{path}: {name} is not a plain C-ordered array")
            yield NpzArrayReader(member, shape, dtype)


class AdmSampleWriter:
    """Writes `arr_0` (uint8 N x H x W x C) batch by batch and `arr_1` (labels) into an uncompressed `.npz`, like
    `np.savez(path, arr_0=images, arr_1=labels)`. Written under a temporary name, renamed on `close()`."""

    def __init__(self, path: Path, labels: np.ndarray, image_shape: tuple[int, int, int]):
        self.path, self.labels = Path(path), np.asarray(labels, dtype=np.int64)
        self.shape = (len(self.labels), *image_shape)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.archive = zipfile.ZipFile(self.tmp, "w", zipfile.ZIP_STORED, allowZip64=True)
        # force_zip64: the member's size is not known up front and passes 4 GB at 50k samples
        self.member = self.archive.open("arr_0.npy", "w", force_zip64=True)
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                  "shape": self.shape}
        np.lib.format.write_array_header_1_0(self.member, header)
        self.written = 0

    def write(self, images: np.ndarray) -> None:
        if images.dtype != np.uint8 or images.shape[1:] != self.shape[1:]:
            raise ValueError(f"expected uint8 images of shape (n, {', '.join(map(str, self.shape[1:]))}), "
                             f"got {images.dtype} {images.shape}")
        if self.written + len(images) > self.shape[0]:
            raise ValueError(f"more than the {self.shape[0]} images this file was opened for")
        self.member.write(np.ascontiguousarray(images).tobytes())
        self.written += len(images)

    def close(self) -> Path:
        if self.written != self.shape[0]:
            raise ValueError(f"{self.written} of {self.shape[0]} images written")
        self.member.close()
        with self.archive.open("arr_1.npy", "w") as member:
            np.lib.format.write_array(member, self.labels)
        self.archive.close()
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        self.member.close()
        self.archive.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> "AdmSampleWriter":
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


@dataclass
class ReferenceBatch:
    """An ADM reference batch: its stored statistics (float64) and the shape of its images (read on demand)."""

    path: Path
    mu: np.ndarray
    sigma: np.ndarray
    mu_s: np.ndarray
    sigma_s: np.ndarray
    images_shape: tuple[int, ...]

    @contextmanager
    def images(self) -> Iterator[NpzArrayReader]:
        with open_npz_array(self.path, "arr_0") as reader:
            yield reader


def read_reference_batch(path: str | Path, what: str = "metric.reference") -> ReferenceBatch:
    """Checks everything the protocol needs from the file before any sampling; one-line errors name it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what}={path} not found; give the local path of the ADM reference batch "
                        "(e.g. VIRTUAL_imagenet256_labeled.npz)")
    with open_npz_array(path, "arr_0") as images:
        shape, dtype = images.shape, images.dtype
    if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3:
        raise UserError(f"{what}={path}: arr_0 is {dtype} {shape}; expected uint8 images N x H x W x 3")
    with np.load(path) as npz:  # members load on access: only the statistics are read here
        missing = [k for k in STATISTICS if k not in npz.files]
        if missing:
            raise UserError(f"{what}={path} holds no {'/'.join(missing)} (it holds {', '.join(npz.files)}); the "
                            "ADM reference batches (VIRTUAL_imagenet256_labeled.npz) carry their dataset statistics")
        stats = {k: npz[k].astype(np.float64) for k in STATISTICS}
    for mean, cov in (("mu", "sigma"), ("mu_s", "sigma_s")):
        d = stats[mean].shape
        if len(d) != 1 or stats[cov].shape != (d[0], d[0]):
            raise UserError(f"{what}={path}: {mean} {d} and {cov} {stats[cov].shape} are not a mean and its "
                            "covariance")
    return ReferenceBatch(path, images_shape=tuple(shape), **stats)
