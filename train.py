"""Vector-quantize a DiT with zero-data block-wise calibration: python train.py quant=w2|w3|w4 [dry_run=true]."""

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))

from vq4dit.cli.build import build_method  # noqa: E402  (the method and its presets: checked before any work)
from vq4dit.cli.entry import preflight, run  # noqa: E402
from vq4dit.cli.outputs import TRAIN_RESULTS  # noqa: E402


def expected_bytes(cfg: DictConfig) -> int:
    from vq4dit.cli.quantize import expected_bytes as count  # the heavy imports only once the config is valid

    return count(cfg)


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> None:
    from vq4dit.cli.estimate import estimate
    from vq4dit.cli.quantize import eval_command, quantize

    if cfg.dry_run:  # what the command costs; nothing is written
        print(run(lambda: estimate(cfg)))
        return
    ckpt = run(lambda: quantize(cfg))
    print(f"checkpoint: {ckpt}\nscore it:   {eval_command(cfg, ckpt)}")


if __name__ == "__main__":
    preflight(Path(__file__).parent / "configs", "train", results=TRAIN_RESULTS, expected_bytes=expected_bytes,
              check_job=build_method)
    main()
