"""What a calibration step costs against a dense fp step on the same block: block 1 of the reference digits DiT,
the full fit schedule (500 steps at batch 16: soft ratios, then hard codes after `harden_at`), timed step by step
inside the ordinary Lightning fit. The dense step trains the block's fp linears themselves with the same loss,
optimizer, batch and Trainer, so the ratio is what the method's layers add.

    python benchmarks/step_cost.py                          # w2, w3, w4 -> benchmarks/results/step-cost/
    python benchmarks/step_cost.py --quants w3 --threads 2 --out /tmp/step-cost
"""

import argparse
import copy
import statistics
import warnings
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import lightning as L
import torch
from harness import ROOT, config, fresh_dir, write_results

from vq4dit.calibration.block_calibration import BlockCalibration
from vq4dit.calibration.block_cost import StepTimer, synthetic_rows
from vq4dit.calibration.pipeline import BlockTrainers, quantize_block
from vq4dit.cli.build import build_method
from vq4dit.errors import instantiate
from vq4dit.methods.block_data import BlockData, with_layers
from vq4dit.quant.block_layers import block_linears


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quants", default="w2,w3,w4")
    p.add_argument("--method", default="vq4dit")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/step-cost"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = fresh_dir(Path(args.out))
    cfg = config("train")
    block = copy.deepcopy(instantiate(cfg.model).blocks[1]).eval().requires_grad_(False)
    fit = instantiate(cfg.fit)
    x, t, y = synthetic_rows(512, 16, block.norm1.linear.in_features, 10, 0)
    with torch.no_grad():
        target = block(x, timestep=t, class_labels=y)
    rows = (x, t, y, target)
    device = torch.device("cpu")
    trainers = BlockTrainers(device, None, partial(L.Trainer, enable_model_summary=False))

    def timed(run) -> list[float]:
        timer = StepTimer(device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run(lambda **kw: trainers(callbacks=[timer], enable_progress_bar=False, **kw))
        return [b - a for a, b in zip(timer.starts, timer.starts[1:])] + [timer.end - timer.starts[-1]]

    def dense(make_trainer):  # the fp linears trained as they are, with the base optimizer and no penalty
        data = BlockData(copy.deepcopy(block), 1, rows, rows, device, seed=0)
        layers = {name: copy.deepcopy(layer) for name, layer in block_linears(data.block).items()}
        method = build_method(config("train", "method=classic_vq"))  # its fitting hooks are the seam's defaults
        module = BlockCalibration(with_layers(data.block, layers), layers, method, fit, data)
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*rows), batch_size=fit.batch_size,
                                             sampler=torch.utils.data.RandomSampler(
                                                 range(len(x)), replacement=True,
                                                 num_samples=fit.iterations * fit.batch_size))
        make_trainer(max_steps=fit.iterations).fit(module, loader)

    steps = timed(dense)
    dense_ms = 1e3 * statistics.median(steps[5:])
    results = [{"row": "dense fp linears", "mean_ms": 1e3 * statistics.mean(steps[5:]), "median_ms": dense_ms}]
    for quant in args.quants.split(","):
        method = build_method(config("train", f"method={args.method}", f"quant={quant}"))
        data = BlockData(copy.deepcopy(block), 1, rows, rows, device, seed=0)
        steps = timed(lambda make_trainer: quantize_block(method, data, fit, make_trainer))
        harden = int(round(getattr(method, "harden_at", 1.0) * fit.iterations))
        results.append({"row": f"{args.method} {quant}", "mean_ms": 1e3 * statistics.mean(steps[5:]),
                        "median_ms": 1e3 * statistics.median(steps[5:]),
                        "soft_median_ms": 1e3 * statistics.median(steps[5:harden]),
                        "hard_median_ms": 1e3 * statistics.median(steps[harden:]) if harden < len(steps) else None})
    for r in results:
        r["mean_vs_dense"] = r["mean_ms"] / dense_ms
    command = "python benchmarks/step_cost.py" + ("" if args.quants == "w2,w3,w4" else f" --quants {args.quants}") + (
        "" if args.threads == 1 else f" --threads {args.threads}")
    setup = {"command": command, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
             "threads": args.threads, "iterations": fit.iterations, "batch_size": fit.batch_size}
    fmt = lambda v: "–" if v is None else f"{v:.1f}"  # noqa: E731
    lines = [f"Command: `{command}` ({setup['date']}, {args.threads} CPU thread(s)). Block 1 of the reference "
             f"digits DiT, {fit.iterations} steps at batch {fit.batch_size} inside the Lightning fit, every step "
             "timed (start to start: the method's hooks included; the first 5 left out). The dense row trains the "
             "block's fp linears with the same loss, optimizer and Trainer.", "",
             "| row | mean step ms | median | soft phase median | hard phase median | mean / dense median |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['row']} | {r['mean_ms']:.1f} | {r['median_ms']:.1f} | {fmt(r.get('soft_median_ms'))} | "
              f"{fmt(r.get('hard_median_ms'))} | {r['mean_vs_dense']:.2f}x |" for r in results]
    write_results(out, results, "\n".join(lines), setup)
    print((out / "results.md").read_text())


if __name__ == "__main__":
    main()
