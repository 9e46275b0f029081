"""Sample from a DiT and score it: python eval.py ckpt=<quantized checkpoint folder | fp weights>."""

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))

from vq4dit.entry import run  # noqa: E402
from vq4dit.evaluate import evaluate  # noqa: E402


@hydra.main(version_base="1.3", config_path="configs", config_name="eval")
def main(cfg: DictConfig) -> None:
    run(lambda: evaluate(cfg))


if __name__ == "__main__":
    main()
