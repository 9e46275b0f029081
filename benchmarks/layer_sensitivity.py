"""Where the bits go: how much each kind of layer of each block adds to the block's error when it alone is
quantized. One zero-data pool of the reference digits DiT; per block and per site (qkv, proj, fc1, fc2, adaln),
that site's linears take plain k-means VQ at `--quant` (data-aware or not) while the rest of the block stays fp,
and the block's MSE on the pool's held-out rows is divided by the MSE of the whole block at that preset. Sites
whose share of the error is small next to their share of the weights are where bits can be taken from.

    python benchmarks/layer_sensitivity.py                        # w2 -> benchmarks/results/layer-sensitivity-w2/
    python benchmarks/layer_sensitivity.py --quant w3 --weighting none
"""

import argparse
from datetime import datetime, timezone
from pathlib import Path

import torch
from harness import ROOT, config, fp_blocks, fresh_dir, write_results

from vq4dit.cli.build import build_method
from vq4dit.methods.block_data import with_layers
from vq4dit.quant.block_layers import INPUT_SITES, block_linears


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quant", default="w2")
    p.add_argument("--weighting", default="input_moment", help="method.kmeans_weighting of the k-means")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    out = fresh_dir(Path(args.out or ROOT / f"benchmarks/results/layer-sensitivity-{args.quant}"))
    cfg = config("train", "method=kmeans", f"quant={args.quant}", f"method.kmeans_weighting={args.weighting}",
                 "paths.output_dir=" + str(ROOT / "logs/benchmark/layer-sensitivity"))
    method = build_method(cfg)
    rows = []
    for data in fp_blocks(cfg):
        i = data.index
        linears = block_linears(data.block)
        start = method.start(linears, data)
        whole = data.heldout_mse(with_layers(data.block, start)).item()
        weights = sum(layer.weight.numel() for layer in linears.values())
        row = {"block": i, "whole_block_mse": whole, "sites": {}}
        for site, names in INPUT_SITES.items():
            alone = data.heldout_mse(with_layers(data.block, {n: start[n] for n in names})).item()
            row["sites"][site] = {"mse_share": alone / whole,
                                  "weight_share": sum(linears[n].weight.numel() for n in names) / weights}
        rows.append(row)
        print(_row_md(row), flush=True)
    setup = {"command": "python benchmarks/layer_sensitivity.py"
                        + ("" if args.quant == "w2" else f" --quant {args.quant}")
                        + ("" if args.weighting == "input_moment" else f" --weighting {args.weighting}"),
             "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "threads": torch.get_num_threads()}
    header = [f"Command: `{setup['command']}` ({setup['date']}). Plain k-means VQ {method.quant.describe()} "
              f"(kmeans_weighting={args.weighting}) on one site at a time, the rest fp: block MSE on "
              f"{cfg.pool.heldout_size} held-out pool rows as a share of the whole quantized block's MSE "
              "(weight share in brackets).", "",
              "| block | " + " | ".join(INPUT_SITES) + " | whole block MSE |",
              "|---|" + "---|" * (len(INPUT_SITES) + 1)]
    write_results(out, rows, "\n".join(header + [_row_md(r) for r in rows]), setup)
    print((out / "results.md").read_text())


def _row_md(r: dict) -> str:
    cells = [f"{s['mse_share']:.2f} ({s['weight_share']:.2f})" for s in r["sites"].values()]
    return f"| {r['block']} | " + " | ".join(cells) + f" | {r['whole_block_mse']:.3g} |"


if __name__ == "__main__":
    main()
