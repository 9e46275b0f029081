"""The quality/size table: full precision, plain k-means VQ, classic VQ and VQ4DiT at w4/w3/w2 on the reference
digits DiT, all with the same sampler, seeds and sample count, plus the calibration step time of a VQ4DiT
student against a dense full-precision step on the same block.

    python benchmarks/vq4dit_digits.py                       # -> benchmarks/results/digits/
    python benchmarks/vq4dit_digits.py --settings vq4dit-w2 --num-samples 100 --out /tmp/quick
"""

import argparse
import copy
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

from harness import ROOT, config, fresh_dir, labelled_rows, quantize_and_score, score_fp, write_results
from vq4dit.errors import instantiate
from vq4dit.quant.block_layers import block_linears, replace_layer
from vq4dit.quant.vq_linear import SoftVQLinear


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/digits"))
    p.add_argument("--settings", default="kmeans-w4,vq4dit-w4,kmeans-w3,vq4dit-w3,kmeans-w2,classic_vq-w2,vq4dit-w2",
                   help="comma-separated <method>-<quant preset>")
    p.add_argument("--num-samples", type=int, default=200)
    args = p.parse_args()
    out = fresh_dir(Path(args.out))
    work = ROOT / "logs" / "benchmark" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    eval_cfg, fp_images, labels, fp = score_fp(work, args.num_samples)
    rows, pictures = [{"setting": "fp32", "bits": 32, **fp}], [("fp32", fp_images)]
    print(_row_md(rows[0]), flush=True)
    for setting in args.settings.split(","):
        method, quant = setting.split("-")
        row, images = quantize_and_score(work, setting, eval_cfg, fp_images, [f"quant={quant}", f"method={method}"])
        rows.append(row)
        pictures.append((setting, images))
        print(_row_md(row), flush=True)
    quants = sorted({s.split("-")[1] for s in args.settings.split(",")}, reverse=True)
    timing = step_times(quants)
    labelled_rows(pictures, labels).save(out / "samples.png")
    setup = {"command": "python benchmarks/vq4dit_digits.py", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
             "num_samples": args.num_samples, "sampler": "DDPM 100 steps, guidance 2, seed 0 (configs/sampler/ddpm.yaml)",
             "threads": torch.get_num_threads(), "step_time_ms": timing}
    write_results(out, rows, table(rows, timing, setup), setup)
    print((out / "results.md").read_text())


def _row_md(r: dict) -> str:
    cell = lambda key, fmt: format(r[key], fmt) if r.get(key) is not None else "–"  # noqa: E731
    return (f"| {r['setting']} | {r['bits']:g} | {r['fid']:.2f} | {r['class_accuracy']:.3f} | "
            f"{cell('psnr_vs_reference', '.1f')} | {cell('hard_block_mse', '.2e')} | {r['model_bytes'] / 1024:.0f} | "
            f"{r['blocks_bytes'] / 1024 if 'blocks_bytes' in r else float('nan'):.0f} | {cell('calibration_s', '.0f')} |")


def table(rows: list[dict], timing: dict, setup: dict) -> str:
    floor = rows[0]["fid_floor"]
    lines = [f"Command: `{setup['command']}` ({setup['date']}, {setup['threads']} CPU threads). "
             f"{setup['num_samples']} samples, {setup['sampler']}. FID on the digits classifier's features; "
             f"real-vs-real FID floor at this sample count: {floor:.2f}.", "",
             "| setting | bits/weight | FID | class acc. | PSNR vs fp (dB) | block MSE (mean) | model KiB | quantized linears KiB | calibration s |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [_row_md(r) for r in rows]
    lines += ["", "Calibration step time on one block, batch 16 (forward + backward + RMSprop step):", "",
              "| student | ms/step |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in timing.items()]
    return "\n".join(lines)


def step_times(quants: list[str], steps: int = 30) -> dict:
    """A dense fp block (weights trainable) vs the VQ4DiT student (ratios, codebooks, biases trainable)."""
    base = config("train")
    model = instantiate(base.model)
    block = model.blocks[0]
    tokens = (model.sample_size // base.model.arch.patch_size) ** 2
    hidden = block.norm1.linear.in_features
    x, t, y = torch.randn(16, tokens, hidden), torch.randint(0, 1000, (16,)), torch.randint(0, 10, (16,))
    with torch.no_grad():
        target = block(x, timestep=t, class_labels=y)
    dense = copy.deepcopy(block)
    for layer in block_linears(dense).values():
        layer.requires_grad_(True)
    times = {"dense fp32 block": _time(dense, x, t, y, target, steps)}
    for quant in quants:
        q = config("train", f"quant={quant}")
        student = copy.deepcopy(block)
        for name, linear in block_linears(block).items():
            replace_layer(student, name, SoftVQLinear.from_linear(linear, q.quant.k, q.quant.d, q.method.candidates,
                                                                  iters=5).requires_grad_(True))
        times[f"VQ4DiT {quant} (k={q.quant.k}, d={q.quant.d}, n={q.method.candidates})"] = _time(student, x, t, y, target, steps)
    return times


def _time(block, x, t, y, target, steps: int) -> float:
    params = [p for p in block.parameters() if p.requires_grad]
    opt = torch.optim.RMSprop(params, lr=1e-4, alpha=0.9)
    for i in range(steps + 3):
        if i == 3:
            start = time.perf_counter()
        opt.zero_grad()
        F.mse_loss(block(x, timestep=t, class_labels=y), target).backward()
        opt.step()
    return 1000 * (time.perf_counter() - start) / steps


if __name__ == "__main__":
    main()
