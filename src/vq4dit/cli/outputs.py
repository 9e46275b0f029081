"""What a run writes into its run folder, and whether it can: checked before any work (entry.preflight) and again
by the job itself (a result file is never overwritten)."""

import os
import shutil
import tempfile
from pathlib import Path

from vq4dit.errors import UserError

TRAIN_RESULTS = ("checkpoint",)
EVAL_RESULTS = ("metrics.json", "samples.png", "samples.npz", "speed.json")


def check_no_results(folder: Path, results: tuple[str, ...]) -> None:
    for name in results:  # earlier results are never overwritten, nor the record beside them
        if (Path(folder) / name).exists():
            raise UserError(f"{Path(folder) / name} already exists; earlier results are never overwritten "
                            "(choose another hydra.run.dir or paths.log_dir)")


def check_writable(folder: Path, key: str = "paths.log_dir (or hydra.run.dir)") -> None:
    """`folder` can be created and written (tried for real: permissions, read-only mounts, a file in the way)."""
    existing = _existing_ancestor(folder)
    try:
        if not existing.is_dir():
            raise NotADirectoryError(f"{existing} is a file")
        os.rmdir(tempfile.mkdtemp(prefix=".vq4dit-write-test-", dir=existing))
    except OSError as e:
        raise UserError(f"output folder {folder} cannot be written ({e.strerror or e}); choose a writable "
                        f"{key}") from None


def check_free_space(folder: Path, nbytes: int) -> None:
    """The disk `folder` goes on has `nbytes` free."""
    free = shutil.disk_usage(_existing_ancestor(folder)).free
    if free < nbytes:
        raise UserError(f"output folder {folder}: {free / 2**20:.0f} MiB free on its disk, this run writes up to "
                        f"{nbytes / 2**20:.0f} MiB; free space or choose another paths.log_dir")


def _existing_ancestor(folder: Path) -> Path:
    existing = Path(folder).absolute()
    while not existing.exists():
        existing = existing.parent
    return existing
