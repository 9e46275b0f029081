"""Choosing the model-level fit's learning rate and length by its held-out output error: a finished checkpoint of
the reference digits DiT is fitted to the fp model's outputs on the zero-data pool of its own seed (the rows its
blocks were calibrated on), once per setting, and the output MSE on the pool's held-out rows is reported before
and after (the fit ships only where it is lower).

    python benchmarks/ablate_model_fit.py --ckpt logs/train/<run>/checkpoint --lrs 1e-5,3e-5,1e-4 --iterations 500
"""

import argparse
import copy
import warnings
from datetime import datetime, timezone
from pathlib import Path

import torch
from harness import ROOT, config, fresh_dir, write_results

from vq4dit.calibration.model_fit import fit_model, model_outputs
from vq4dit.calibration.pipeline import default_trainer
from vq4dit.calibration.settings import ModelFitSettings
from vq4dit.calibration.zero_data import ZeroDataBlockInputs
from vq4dit.errors import instantiate
from vq4dit.quant.checkpoint import load_quantized, read_manifest


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--lrs", default="1e-5,3e-5,1e-4")
    p.add_argument("--iterations", default="500", help="comma-separated")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/ablation-model-fit"))
    args = p.parse_args()
    out = fresh_dir(Path(args.out))
    manifest = read_manifest(Path(args.ckpt))
    cfg = config("train", f"seed={manifest['seed']}", "trainer.enable_progress_bar=false")
    device = torch.device("cpu")
    fp = instantiate(cfg.model)
    pool = ZeroDataBlockInputs(fp, instantiate(cfg.sampler), cfg.pool.trajectories, cfg.pool.size, cfg.seed,
                               cfg.pool.heldout_trajectories, cfg.pool.heldout_size, progress=False)
    targets = model_outputs(fp, (pool.inputs, pool.timesteps, pool.labels), device, "fp32")
    part = lambda rows: (pool.inputs[rows], pool.timesteps[rows], pool.labels[rows], targets[rows])  # noqa: E731
    quantized = load_quantized(Path(args.ckpt), cfg.model)
    rows = []
    for iterations in (int(i) for i in args.iterations.split(",")):
        for lr in (float(v) for v in args.lrs.split(",")):
            model = copy.deepcopy(quantized)
            settings = ModelFitSettings(iterations=iterations, lr=lr)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                stats = fit_model(model, part(pool.train_rows), part(pool.heldout_rows), settings,
                                  default_trainer(device, trainer=instantiate(cfg.trainer)), device, "fp32", cfg.seed)
            rows.append({"lr": lr, **stats})
            print(rows[-1], flush=True)
    setup = {"command": f"python benchmarks/ablate_model_fit.py --ckpt {args.ckpt} --lrs {args.lrs} "
                        f"--iterations {args.iterations}",
             "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "checkpoint_method": manifest["method"],
             "threads": torch.get_num_threads()}
    lines = [f"Command: `{setup['command']}` ({setup['date']}). Output MSE of the quantized model against the fp "
             f"model on {cfg.pool.heldout_size} held-out pool rows, before and after the model-level fit.", "",
             "| iterations | lr | before | after | after / before |", "|---|---|---|---|---|"]
    lines += [f"| {r['iterations']} | {r['lr']:g} | {r['start_mse']:.4g} | {r['fitted_mse']:.4g} | "
              f"{r['fitted_mse'] / r['start_mse']:.3f} |" for r in rows]
    write_results(out, rows, "\n".join(lines), setup)
    print((out / "results.md").read_text())


if __name__ == "__main__":
    main()
