"""What a calibration step costs against a dense fp step on the same block: block 1 of the reference digits DiT,
the full fit schedule (500 steps at batch 16: soft ratios, then hard codes after `harden_at`), timed step by step
inside the ordinary Lightning fit. The dense step trains the block's fp linears themselves with the same loss,
optimizer, batch and Trainer, so the ratio is what the method's layers add. Every repeat runs the dense fit and
each method's fit back to back in this one process and takes its own ratio; the table gives min / median / max
of the ratios over the repeats, so a busy machine shows up as spread rather than as a wrong figure.

    python benchmarks/step_cost.py                          # w2, w3, w4 -> benchmarks/results/step-cost/
    python benchmarks/step_cost.py --threads 2              # -> benchmarks/results/step-cost-2threads/
    python benchmarks/step_cost.py --quants w3 --repeats 1 --out /tmp/step-cost
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
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None, help="default: benchmarks/results/step-cost[-<threads>threads]")
    args = p.parse_args()
    if args.repeats < 1 or args.threads < 1:
        p.error(f"--repeats {args.repeats} --threads {args.threads}; valid: both at least 1")
    default_out = "step-cost" + ("" if args.threads == 1 else f"-{args.threads}threads")
    args.out = args.out or str(ROOT / "benchmarks/results" / default_out)
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

    methods = {quant: build_method(config("train", f"method={args.method}", f"quant={quant}"))
               for quant in args.quants.split(",")}
    runs = {"dense fp linears": [], **{f"{args.method} {quant}": [] for quant in methods}}
    for _ in range(args.repeats):  # dense and every method back to back: each repeat's ratio shares its conditions
        runs["dense fp linears"].append(timed(dense))
        for quant, method in methods.items():
            data = BlockData(copy.deepcopy(block), 1, rows, rows, device, seed=0)
            runs[f"{args.method} {quant}"].append(
                timed(lambda make_trainer: quantize_block(method, data, fit, make_trainer)))
    harden = {f"{args.method} {q}": int(round(getattr(m, "harden_at", 1.0) * fit.iterations))
              for q, m in methods.items()}
    dense_median = [statistics.median(steps[5:]) for steps in runs["dense fp linears"]]
    results = []
    for row, repeats in runs.items():
        cut = harden.get(row, fit.iterations)
        phases = {"mean": lambda steps: statistics.mean(steps[5:]),
                  "soft": lambda steps: statistics.median(steps[5:cut]) if row in harden else None,
                  "hard": lambda steps: statistics.median(steps[cut:]) if cut < fit.iterations else None}
        result = {"row": row}
        for phase, of in phases.items():
            seconds = [of(steps) for steps in repeats]
            if seconds[0] is None:
                continue
            ratios = [v / d for v, d in zip(seconds, dense_median)]
            result[phase] = {"ms": 1e3 * statistics.median(seconds), "vs_dense": statistics.median(ratios),
                             "min": min(ratios), "max": max(ratios), "ratios": ratios}
        results.append(result)
    command = "python benchmarks/step_cost.py" + ("" if args.quants == "w2,w3,w4" else f" --quants {args.quants}") + (
        "" if args.threads == 1 else f" --threads {args.threads}") + (
        "" if args.repeats == 3 else f" --repeats {args.repeats}")
    setup = {"command": command, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
             "threads": args.threads, "repeats": args.repeats, "iterations": fit.iterations,
             "batch_size": fit.batch_size, "torch": torch.__version__}
    lines = [f"Command: `{command}` ({setup['date']}, {args.threads} CPU thread(s), {args.repeats} repeats). Block 1 "
             f"of the reference digits DiT, {fit.iterations} steps at batch {fit.batch_size} inside the Lightning "
             "fit, every step timed (start to start: the method's hooks included; the first 5 left out). The dense "
             "row trains the block's fp linears with the same loss, optimizer and Trainer. Each ratio is to the "
             "dense fit's median step of the same repeat: median (min–max) over the repeats.", "",
             "| row | mean step ms | mean / dense | soft phase median ms | soft / dense | hard phase median ms | "
             "hard / dense |", "|---|---|---|---|---|---|---|"]
    cell = lambda r, phase: ("– | –" if phase not in r else  # noqa: E731
                             f"{r[phase]['ms']:.1f} | {r[phase]['vs_dense']:.2f}x "
                             f"({r[phase]['min']:.2f}–{r[phase]['max']:.2f})")
    lines += [f"| {r['row']} | {cell(r, 'mean')} | {cell(r, 'soft')} | {cell(r, 'hard')} |" for r in results]
    write_results(out, results, "\n".join(lines), setup)
    print((out / "results.md").read_text())


if __name__ == "__main__":
    main()
