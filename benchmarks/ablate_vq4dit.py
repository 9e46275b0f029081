"""Choosing VQ4DiT's defaults by measurement: each switch where the paper and its released code differ (and the
hardening schedule) flipped one at a time from configs/method/vq4dit.yaml, on blocks of the reference digits
DiT. With full-precision inputs (the default) blocks are independent, so each variant calibrates the same
blocks on the same zero-data pool; reported are the soft mixture's block MSE just before hardening and the
calibrated hard block's, both divided by plain k-means's, on the pool's held-out rows (trajectories calibration
never trained on).

    python benchmarks/ablate_vq4dit.py                          # w2, blocks 1 and 4 -> benchmarks/results/ablation-w2/
    python benchmarks/ablate_vq4dit.py --quant w3 --blocks 0,5 --variants defaults,n=3
"""

import argparse
from datetime import datetime, timezone
from pathlib import Path

import torch
from harness import ROOT, config, fp_blocks, fresh_dir, write_results

from vq4dit.calibration.pipeline import default_trainer, quantize_block
from vq4dit.cli.quantize import build_method
from vq4dit.errors import instantiate

VARIANTS = {
    "defaults": [],
    "harden at the end (paper and code)": ["method.harden_at=1.0"],
    "constant regulariser weight": ["method.reg_schedule=constant"],
    "reg_weight=0.01": ["method.reg_weight=0.01"],
    "reg_weight=1": ["method.reg_weight=1.0"],
    "regulariser of the released code": ["method.regularizer=code"],
    "n=3": ["method.candidates=3"],
    "inverse-distance ratio init (code)": ["method.ratio_init=inverse_distance"],
    "codebook trains after freeze (code)": ["method.codebook_training=after_freeze"],
    "uniform ratio init (paper)": ["method.ratio_init=uniform"],
    "joint codebook training (paper)": ["method.codebook_training=joint"],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quant", default="w2")
    p.add_argument("--blocks", default="1,4")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names from VARIANTS")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    out = fresh_dir(Path(args.out or ROOT / f"benchmarks/results/ablation-{args.quant}"))
    base = ["paths.output_dir=" + str(ROOT / "logs/benchmark/ablation"), f"quant={args.quant}",
            "trainer.enable_progress_bar=false"]
    cfg = config("train", *base)
    device = torch.device(cfg.device)
    blocks = [int(b) for b in args.blocks.split(",")]
    data = {}
    for block_data in fp_blocks(cfg):
        data[block_data.index] = block_data
        if block_data.index == max(blocks):
            break
    rows = []
    for name in args.variants.split(","):
        vcfg = config("train", *base, *VARIANTS[name])
        trainer = default_trainer(device, trainer=instantiate(vcfg.trainer))
        per_block = [quantize_block(build_method(vcfg), data[i], instantiate(vcfg.fit), trainer)[1] for i in blocks]
        rows.append({"variant": name, "overrides": VARIANTS[name], "blocks": per_block})
        print(_row_md(rows[-1]), flush=True)
    setup = {"command": f"python benchmarks/ablate_vq4dit.py --quant {args.quant} --blocks {args.blocks}"
                        + (f" --variants {args.variants}" if args.variants != ",".join(VARIANTS) else ""),
             "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "threads": torch.get_num_threads()}
    header = [f"Command: `{setup['command']}` ({setup['date']}). k={cfg.quant.k}, d={cfg.quant.d}; block MSE on "
              f"{cfg.pool.heldout_size} held-out pool rows divided by plain k-means's, per block ({args.blocks}).", "",
              "| variant | soft / k-means | calibrated hard / k-means | hard at hardening / k-means |",
              "|---|---|---|---|"]
    write_results(out, rows, "\n".join(header + [_row_md(r) for r in rows]), setup)
    print((out / "results.md").read_text())


def _row_md(r: dict) -> str:
    rel = lambda key: ", ".join(f"{b[key] / b['start_mse']:.3f}" for b in r["blocks"])  # noqa: E731
    return f"| {r['variant']} | {rel('soft_mse')} | **{rel('method_mse')}** | {rel('hard_mse_at_harden')} |"


if __name__ == "__main__":
    main()
