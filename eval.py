"""Sample from a DiT and score it: python eval.py ckpt=<quantized checkpoint folder | fp weights>."""

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))

from vq4dit.cli.entry import preflight, run  # noqa: E402
from vq4dit.cli.outputs import EVAL_RESULTS  # noqa: E402


def expected_bytes(cfg: DictConfig) -> int:
    from vq4dit.cli.evaluate import expected_bytes as count  # the heavy imports only once the config is valid

    return count(cfg)


@hydra.main(version_base="1.3", config_path="configs", config_name="eval")
def main(cfg: DictConfig) -> None:
    from vq4dit.cli.evaluate import evaluate

    run(lambda: evaluate(cfg))


if __name__ == "__main__":
    preflight(Path(__file__).parent / "configs", "eval", results=EVAL_RESULTS, expected_bytes=expected_bytes)
    main()
