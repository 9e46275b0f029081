"""Write a DiT as a diffusers folder: python export.py ckpt=<quantized checkpoint folder | fp weights> out=<folder>."""

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))

from vq4dit.cli.entry import preflight, run  # noqa: E402


@hydra.main(version_base="1.3", config_path="configs", config_name="export")
def main(cfg: DictConfig) -> None:
    from vq4dit.cli.export import export

    run(lambda: export(cfg))


if __name__ == "__main__":
    preflight(Path(__file__).parent / "configs", "export", results=(), new_folders=("out",))
    main()
