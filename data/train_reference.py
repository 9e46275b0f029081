"""Trains the shipped reference models, the digits DiT and the digits classifier, on scikit-learn's digits.

    python data/train_reference.py reference=classifier   # -> data/digit_classifier.safetensors (+ .json)
    python data/train_reference.py reference=dit          # -> data/dit_digits/ (diffusers folder + vq4dit.json)
"""

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from vq4dit.cli.entry import run
from vq4dit.reference.fit import fit_reference

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PROJECT_ROOT", str(ROOT))


@hydra.main(version_base="1.3", config_path=str(ROOT / "configs"), config_name="reference")
def main(cfg: DictConfig) -> None:
    print(f"saved {run(lambda: fit_reference(cfg))}")


if __name__ == "__main__":
    sys.exit(main())
