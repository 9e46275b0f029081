"""Vector-quantize a DiT with zero-data block-wise calibration: python train.py quant=w2|w3|w4 [dry_run=true]."""

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))

from vq4dit.entry import run  # noqa: E402
from vq4dit.estimate import estimate  # noqa: E402
from vq4dit.quantize import quantize  # noqa: E402


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> None:
    if cfg.dry_run:  # what the command costs; nothing is written
        print(run(lambda: estimate(cfg)))
        return
    ckpt = run(lambda: quantize(cfg))
    print(f"checkpoint: {ckpt}\nscore it:   python eval.py model={cfg.model.name} ckpt={ckpt}")


if __name__ == "__main__":
    main()
