"""Does a mixed bit assignment beat uniform 3 bits at the same budget? Per block of the reference digits DiT, the
data-aware k-means start (no calibration) with every site at w3 (k 64, d 2) against assignments that take bits
from the sites layer_sensitivity.py finds cheap (adaLN, fc1) and give them to the rest; block MSE on the pool's
held-out rows, and the assignment's code bits per weight.

    python benchmarks/mixed_bits.py          # -> benchmarks/results/mixed-bits/
"""

import argparse
import math
from datetime import datetime, timezone
from pathlib import Path

import torch
from harness import ROOT, config, fp_blocks, fresh_dir, write_results

from vq4dit.cli.build import build_method
from vq4dit.methods.block_data import with_layers
from vq4dit.quant.block_layers import INPUT_SITES, block_linears

# site -> (k, d); "*": every other site
PLANS = {"w3 everywhere (k64 d2)": {"*": (64, 2)},
         "adaln 2 bits (k256 d4), the rest 3.5 (k128 d2)": {"adaln": (256, 4), "*": (128, 2)},
         "adaln and fc1 2 bits (k256 d4), the rest 4 (k256 d2)": {"adaln": (256, 4), "fc1": (256, 4), "*": (256, 2)}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/mixed-bits"))
    args = p.parse_args()
    out = fresh_dir(Path(args.out))
    cfg = config("train", "method=kmeans", "method.kmeans_weighting=input_moment")
    site_of = {name: site for site, names in INPUT_SITES.items() for name in names}
    methods = {}
    rows = []
    for data in fp_blocks(cfg):
        i = data.index
        linears = block_linears(data.block)
        row = {"block": i, "plans": {}}
        for plan_name, plan in PLANS.items():
            layers, bits = {}, 0.0
            for name, linear in linears.items():
                k, d = plan.get(site_of[name], plan["*"])
                key = (k, d)
                if key not in methods:
                    methods[key] = build_method(config("train", "method=kmeans", "method.kmeans_weighting=input_moment",
                                                       f"quant.k={k}", f"quant.d={d}"))
                layers[name] = methods[key].start({name: linear}, data)[name]
                bits += linear.weight.numel() * math.log2(k) / d
            weights = sum(linear.weight.numel() for linear in linears.values())
            row["plans"][plan_name] = {"mse": data.heldout_mse(with_layers(data.block, layers)).item(),
                                       "bits": bits / weights}
        rows.append(row)
        print(row, flush=True)
    setup = {"command": "python benchmarks/mixed_bits.py",
             "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "threads": torch.get_num_threads()}
    names = list(PLANS)
    lines = [f"Command: `{setup['command']}` ({setup['date']}). Data-aware k-means start, no calibration; block MSE "
             f"on {cfg.pool.heldout_size} held-out pool rows relative to w3 everywhere (code bits per weight in the "
             "header).", "",
             "| block | " + " | ".join(f"{n} ({rows[0]['plans'][n]['bits']:.2f} b)" for n in names) + " |",
             "|---|" + "---|" * len(names)]
    lines += [f"| {r['block']} | " + " | ".join(f"{r['plans'][n]['mse'] / r['plans'][names[0]]['mse']:.2f}"
                                             for n in names) + " |" for r in rows]
    write_results(out, rows, "\n".join(lines), setup)
    print((out / "results.md").read_text())


if __name__ == "__main__":
    main()
