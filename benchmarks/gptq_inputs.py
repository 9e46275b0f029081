"""Which block inputs the Hessian methods (GPTQ, Q-DiT) should take their Hessians on: the fp model's
(`pool.student_inputs=fp`) or the outputs of the already-quantized earlier blocks (`quantized`, as both authors do).
Every row is quantized both ways on the same pool (the reference digits DiT, the configured pool of the seed), one
run at a time, and the quantized model's output MSE against the fp model's on the pool's held-out rows (their own
trajectories, never calibrated on) is reported: lower is better.

    python benchmarks/gptq_inputs.py --rows gptq-w3g64,gptq-w2g64,qdit-w4a8 --seeds 0,1
    python benchmarks/gptq_inputs.py --rows gptq-w2g64+act_order=false,gptq-w2g64+static_groups=true --inputs fp

A row is `<method>-<quant preset>`, then `+key=value` for a method setting (`qdit-w3pc+search.generations=0`). A
Q-DiT row searches its group sizes in the fp run and reuses them (`method.group_sizes`) in the quantized one: the
search runs on the fp model before the blocks, so the two runs differ only in their block inputs. `--inputs` runs
only some of the two (to compare settings of a method at one choice of inputs).
"""

import argparse
import copy
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
    args = p.parse_args()
    out = fresh_dir(Path(args.out))
    torch.set_num_threads(1)  # train.py's default: the same result twice
    device = torch.device("cpu")
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        cfg = config("train", f"seed={seed}")
        fp = instantiate(cfg.model)
        pool = ZeroDataBlockInputs.of(fp, instantiate(cfg.sampler), instantiate(cfg.pool), seed, progress=False)
        heldout = tuple(r[pool.heldout_rows] for r in (pool.inputs, pool.timesteps, pool.labels))
        target = model_outputs(fp, heldout, device, "fp32")
        for row in args.rows.split(","):
            reuse = []
            for inputs in args.inputs.split(","):
                cfg = config("train", f"seed={seed}", *overrides(row), *reuse)
                run_dir = out / "runs" / f"{row}-{inputs}-seed{seed}"
                run_dir.mkdir(parents=True)
                model = copy.deepcopy(fp)
                mark = time.time()
                result = quantize_model(model, build_method(cfg), pool, device=device, seed=seed,
                                        student_inputs=inputs, progress=False, output_dir=run_dir,
                                        scorer=lambda cfg=cfg: instantiate(cfg.metric))
                seconds = time.time() - mark
                mse = torch.nn.functional.mse_loss(model_outputs(model, heldout, device, "fp32"), target).item()
                rows.append({"row": row, "seed": seed, "student_inputs": inputs, "output_mse": mse,
                             "block_shipped_mse": [b["shipped_mse"] for b in result.blocks],
                             "kept": [b["kept"] for b in result.blocks], "seconds": round(seconds, 1)})
                print(rows[-1], flush=True)
                if (run_dir / RESULT_FILE).exists():  # the searched group sizes, the same for both inputs
                    reuse = [f"method.group_sizes={run_dir / RESULT_FILE}"]
    setup = {"command": f"python benchmarks/gptq_inputs.py --rows {args.rows} --seeds {args.seeds} "
                        f"--inputs {args.inputs}",
             "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "threads": torch.get_num_threads(),
             "heldout_rows": len(target), "pool": dict(cfg.pool)}
    write_results(out, rows, table(rows, setup), setup)
    print((out / "results.md").read_text())


def table(rows: list[dict], setup: dict) -> str:
    mse = {(r["row"], r["seed"], r["student_inputs"]): r["output_mse"] for r in rows}
    inputs = list(dict.fromkeys(r["student_inputs"] for r in rows))
    both = set(inputs) == {"fp", "quantized"}
    lines = [f"Command: `{setup['command']}` ({setup['date']}, {setup['threads']} thread). Output MSE of the "
             f"quantized digits DiT against the fp model on the pool's {setup['heldout_rows']} held-out rows, with "
             "Hessians taken on fp block inputs or on the quantized earlier blocks' outputs (lower is better).", "",
             "| row | seed | " + " | ".join(f"{i} inputs" for i in inputs) + (" | quantized / fp |" if both else " |"),
             "|---|---|" + "---|" * (len(inputs) + both)]
    for row, seed in dict.fromkeys((r["row"], r["seed"]) for r in rows):
        cells = [f"{mse[(row, seed, i)]:.4g}" for i in inputs]
        if both:
            cells.append(f"{mse[(row, seed, 'quantized')] / mse[(row, seed, 'fp')]:.3f}")
        lines.append(f"| {row} | {seed} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
