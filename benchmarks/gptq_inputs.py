"""Which block inputs the Hessian methods (GPTQ, Q-DiT) should take their Hessians on: the fp model's
(`pool.student_inputs=fp`) or the outputs of the already-quantized earlier blocks (`quantized`, as both authors do).
Every row is quantized both ways on the same pool (the reference digits DiT, the configured pool of the seed), one
run at a time, and the quantized model's output MSE against the fp model's on the pool's held-out rows (their own
trajectories, never calibrated on) is reported: lower is better.

    python benchmarks/gptq_inputs.py --rows gptq-w3g64,gptq-w2g64,qdit-w4a8 --seeds 0,1
    python benchmarks/gptq_inputs.py --rows gptq-w2g64+act_order=false,gptq-w2g64+static_groups=true --inputs fp

A row is `<method>-<quant preset>`, then `+key=value` for a method setting (`qdit-w3pc+search.generations=0`). A
Q-DiT row searches its group sizes once, in its first run, and every other run of the row reuses them
(`method.group_sizes`): the search runs on the fp model before the blocks, so the runs differ only in their block
inputs (and seed). `--inputs` runs only some of the two (to compare settings of a method at one choice of inputs).

The ratio quantized / fp comes with a 95 % paired bootstrap interval over the held-out rows (the same rows resampled
for both runs). Rows of one trajectory are correlated, so the interval is narrower than a resampling of
trajectories would give; the seeds (separate pools) are the stronger check. Results are written after every run;
`--resume` continues an interrupted command in its folder.
"""

import argparse
import copy
import json
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from harness import ROOT, config, fresh_dir, write_results

from vq4dit.calibration.model_fit import model_outputs
from vq4dit.calibration.pipeline import quantize_model
from vq4dit.calibration.zero_data import ZeroDataBlockInputs
from vq4dit.cli.build import build_method
from vq4dit.errors import instantiate
from vq4dit.methods.qdit import RESULT_FILE


def overrides(row: str) -> list[str]:
    name, *settings = row.split("+")
    method, _, preset = name.partition("-")
    return [f"method={method}", f"quant={preset}", *(f"method.{s}" for s in settings)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="gptq-w3g64,gptq-w2g64,qdit-w4a8")
    p.add_argument("--seeds", default="0")
    p.add_argument("--inputs", default="fp,quantized", help="pool.student_inputs values to run, comma-separated")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/gptq-inputs"))
    p.add_argument("--resume", action="store_true", help="continue an interrupted run of this command in --out")
    args = p.parse_args()
    command = f"python benchmarks/gptq_inputs.py --rows {args.rows} --seeds {args.seeds} --inputs {args.inputs}"
    out = Path(args.out)
    if args.resume:
        setup = json.loads((out / "results.json").read_text())
        rows = setup.pop("rows")
        if setup["command"] != command:
            raise SystemExit(f"error: {out} holds the results of `{setup['command']}`, not of this command")
        setup["resumed"] = [*setup.get("resumed", []), now()]
    else:
        fresh_dir(out)
        rows, setup = [], {"command": command, "date": now(), "threads": 1}
    torch.set_num_threads(1)  # train.py's default: the same result twice
    device = torch.device("cpu")
    for seed in (int(s) for s in args.seeds.split(",")):
        todo = [(row, inputs) for row in args.rows.split(",") for inputs in args.inputs.split(",")
                if not any((r["row"], r["seed"], r["student_inputs"]) == (row, seed, inputs) for r in rows)]
        if not todo:
            continue
        cfg = config("train", f"seed={seed}")
        fp = instantiate(cfg.model)
        pool = ZeroDataBlockInputs.of(fp, instantiate(cfg.sampler), instantiate(cfg.pool), seed, progress=False)
        heldout = tuple(r[pool.heldout_rows] for r in (pool.inputs, pool.timesteps, pool.labels))
        target = model_outputs(fp, heldout, device, "fp32")
        setup.update(heldout_rows=len(target), pool=dict(cfg.pool))
        for row, inputs in todo:
            searched = sorted((out / "runs").glob(f"{glob_escape(row)}-*/{RESULT_FILE}"))
            reuse = [f"method.group_sizes={searched[0]}"] if searched else []  # the row's searched group sizes
            cfg = config("train", f"seed={seed}", *overrides(row), *reuse)
            run_dir = out / "runs" / f"{row}-{inputs}-seed{seed}"
            run_dir.mkdir(parents=True, exist_ok=True)
            model = copy.deepcopy(fp)
            mark = time.time()
            result = quantize_model(model, build_method(cfg), pool, device=device, seed=seed,
                                    student_inputs=inputs, progress=False, output_dir=run_dir,
                                    scorer=lambda cfg=cfg: instantiate(cfg.metric))
            seconds = time.time() - mark
            per_row = (model_outputs(model, heldout, device, "fp32") - target).square().flatten(1).mean(1)
            rows.append({"row": row, "seed": seed, "student_inputs": inputs, "output_mse": per_row.mean().item(),
                         "block_shipped_mse": [b["shipped_mse"] for b in result.blocks],
                         "kept": [b["kept"] for b in result.blocks], "seconds": round(seconds, 1),
                         "group_sizes": reuse[0].partition("=")[2] if reuse else None,
                         "heldout_row_mse": per_row.tolist()})
            print({k: v for k, v in rows[-1].items() if k != "heldout_row_mse"}, flush=True)
            write_results(out, rows, table(rows, setup), setup)
    print((out / "results.md").read_text())


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def glob_escape(text: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)


def paired_ratio(fp: list[float], quantized: list[float], reps: int = 2000) -> tuple[float, float]:
    """95 % interval of mean(quantized) / mean(fp) over resamples of the held-out rows (the same for both)."""
    a, b = torch.tensor(fp, dtype=torch.float64), torch.tensor(quantized, dtype=torch.float64)
    index = torch.randint(len(a), (reps, len(a)), generator=torch.Generator().manual_seed(0))
    ratios = b[index].mean(1) / a[index].mean(1)
    return ratios.quantile(0.025).item(), ratios.quantile(0.975).item()


def table(rows: list[dict], setup: dict) -> str:
    run = {(r["row"], r["seed"], r["student_inputs"]): r for r in rows}
    inputs = list(dict.fromkeys(r["student_inputs"] for r in rows))
    both = set(inputs) == {"fp", "quantized"}
    resumed = f"; interrupted and resumed at {', '.join(setup['resumed'])}" if setup.get("resumed") else ""
    lines = [f"Command: `{setup['command']}` (started {setup['date']}{resumed}; {setup['threads']} thread). Output "
             f"MSE of the quantized digits DiT against the fp model on the pool's {setup.get('heldout_rows')} "
             "held-out rows, with Hessians taken on fp block inputs or on the quantized earlier blocks' outputs "
             "(lower is better); quantized / fp with its 95 % paired bootstrap interval over those rows.", "",
             "| row | seed | " + " | ".join(f"{i} inputs" for i in inputs) + (" | quantized / fp |" if both else " |"),
             "|---|---|" + "---|" * (len(inputs) + both)]
    for row, seed in dict.fromkeys((r["row"], r["seed"]) for r in rows):
        cells = [f"{run[(row, seed, i)]['output_mse']:.4g}" if (row, seed, i) in run else "–" for i in inputs]
        if both:
            fp, q = run.get((row, seed, "fp")), run.get((row, seed, "quantized"))
            if fp and q:
                low, high = paired_ratio(fp["heldout_row_mse"], q["heldout_row_mse"])
                cells.append(f"{q['output_mse'] / fp['output_mse']:.3f} [{low:.3f}, {high:.3f}]")
            else:
                cells.append("–")
        lines.append(f"| {row} | {seed} | " + " | ".join(cells) + " |")
    if setup.get("note"):
        lines += ["", f"Note: {setup['note']}."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
