"""Choosing VQ4DiT's defaults by measurement: each switch where the paper and its released code differ (and the
hardening schedule) flipped one at a time from the defaults in configs/method/vq4dit.yaml, on the reference
digits DiT at one bit-width. Reports block MSE (soft mixture before hardening, and the hard block that ships,
both relative to plain k-means) and the eval protocol's FID, class accuracy and PSNR against fp samples.

    python benchmarks/ablate_vq4dit.py                 # w2 -> benchmarks/results/ablation-w2/
    python benchmarks/ablate_vq4dit.py --quant w3 --out benchmarks/results/ablation-w3
"""

import argparse
from datetime import datetime, timezone
from pathlib import Path

import torch

from harness import ROOT, fresh_dir, quantize_and_score, score_fp, write_results

VARIANTS = {
    "defaults": [],
    "harden at the end (harden_at=1)": ["method.harden_at=1.0"],
    "constant regulariser weight": ["method.reg_schedule=constant"],
    "reg_weight=0.01": ["method.reg_weight=0.01"],
    "reg_weight=1": ["method.reg_weight=1.0"],
    "regulariser of the released code": ["method.regularizer=code"],
    "n=3 candidates": ["method.candidates=3"],
    "inverse-distance ratio init": ["method.ratio_init=inverse_distance"],
    "codebook trains after freeze": ["method.codebook_training=after_freeze"],
    "student inputs from quantized predecessor": ["method.student_inputs=quantized"],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quant", default="w2")
    p.add_argument("--out", default=None)
    p.add_argument("--num-samples", type=int, default=500)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names from VARIANTS")
    args = p.parse_args()
    out = fresh_dir(Path(args.out or ROOT / f"benchmarks/results/ablation-{args.quant}"))
    work = ROOT / "logs" / "benchmark" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    eval_cfg, fp_images, _, fp = score_fp(work, args.num_samples)
    rows = []
    for i, name in enumerate(args.variants.split(",")):
        row, _ = quantize_and_score(work, f"v{i}", eval_cfg, fp_images, [f"quant={args.quant}", *VARIANTS[name]])
        rows.append({**row, "variant": name, "overrides": VARIANTS[name]})
        print(_row_md(rows[-1]), flush=True)
    setup = {"command": f"python benchmarks/ablate_vq4dit.py --quant {args.quant}",
             "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "num_samples": args.num_samples,
             "threads": torch.get_num_threads(), "fp": fp}
    header = [f"Command: `{setup['command']}` ({setup['date']}). {args.num_samples} samples, DDPM 100 steps, guidance 2. "
              f"Full precision: FID {fp['fid']:.2f}, class accuracy {fp['class_accuracy']:.3f}. Block MSE is the mean "
              "over blocks divided by plain k-means's.", "",
              "| variant | soft MSE / k-means | hard MSE / k-means | FID | class acc. | PSNR vs fp (dB) | calibration s |",
              "|---|---|---|---|---|---|---|"]
    write_results(out, rows, "\n".join(header + [_row_md(r) for r in rows]), setup)
    print((out / "results.md").read_text())


def _row_md(r: dict) -> str:
    rel = lambda key: f"{r[key] / r['kmeans_block_mse']:.3f}" if r.get(key) is not None else "–"  # noqa: E731
    return (f"| {r['variant']} | {rel('soft_block_mse')} | {rel('hard_block_mse')} | {r['fid']:.2f} | "
            f"{r['class_accuracy']:.3f} | {r['psnr_vs_reference']:.1f} | {r['calibration_s']:.0f} |")


if __name__ == "__main__":
    main()
