"""Calibration speed and reproducibility at a given torch thread count: one block of the reference digits DiT.

    python benchmarks/threads.py --threads 1      # prints: threads, fit seconds, s/step, digest of the block

The pool (small, sampled once per process) and block 0's VQ4DiT w3 calibration run at `--threads`; the digest
is a sha256 of the block's stored tensors, so two runs at the same thread count can be compared for bytes.
Time it from outside as a whole process (docs/reliability.md), e.g. with GNU time:
    /usr/bin/time -v python benchmarks/threads.py --threads 2
"""

import argparse
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PROJECT_ROOT", str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--iterations", type=int, default=100)
    args = parser.parse_args()

    import torch
    from hydra import compose, initialize_config_dir

    from vq4dit.calibration.block_cache import tensors_digest
    from vq4dit.calibration.pipeline import quantize_model
    from vq4dit.calibration.zero_data import ZeroDataBlockInputs
    from vq4dit.cli.build import build_method
    from vq4dit.errors import instantiate
    from vq4dit.methods.base import FitSettings
    from vq4dit.quant.checkpoint import quantized_layers

    torch.set_num_threads(args.threads)
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["quant=w3", "sampler.steps=20", "paths.output_dir=/tmp/unused"])
    model, sampler = instantiate(cfg.model), instantiate(cfg.sampler)
    pool = ZeroDataBlockInputs(model, sampler, 16, 256, 0, 2, 64, progress=False)
    start = time.perf_counter()
    quantize_model(model, build_method(cfg), pool, fit=FitSettings(iterations=args.iterations), blocks=[0],
                   progress=False, trainer=None)
    seconds = time.perf_counter() - start
    stored = {f"{name}.{key}": t for name, layer in quantized_layers(model).items()
              for key, t in layer.stored()[0].items()}
    print(f"threads {args.threads} fit_seconds {seconds:.2f} s_per_step {seconds / args.iterations:.4f} "
          f"digest {tensors_digest(stored)[:16]}", flush=True)


if __name__ == "__main__":
    main()
