"""What four departures of the comparison's rows from their authors' releases cost on the reference digits DiT
(benchmarks/compare.py quotes the results in the table's notes).

- `embedders`: every row quantizes the block linears only; PTQ4DiT's release wraps every Linear and Conv, so it also
  quantizes the patch embedder, the timestep embedder's MLP and the final layer (weights per output channel, inputs
  static per tensor, at the row's bits). A PTQ4DiT model is quantized through the Python API as the table's row is,
  with `--iterations` reconstruction steps per block (the row runs 500: fewer keeps this cheap, and the blocks' error
  is then that of a short reconstruction), and measured as the table runs it and with those layers quantized too:
  round to nearest, and static input ranges calibrated as the blocks' are (the release would then reconstruct them).
- `kmeans_points`: k-means runs Lloyd on at most 256 sub-vectors per codeword (`method.kmeans_points_per_codeword`)
  where VQ4DiT's released code uses all of them. A model is quantized with k-means as VQ4DiT starts (data-aware
  weighting) both ways; VQ4DiT's fit after that start is not run here.
- `rounding`: PTQ4DiT's AdaRound regulariser is far weaker than its release's and its offsets learn too slowly to
  decide in 500 steps (`RELEASE_ROUNDING`). One block of a PTQ4DiT preset is reconstructed for the table's 500x16
  with the row's settings and with `RELEASE_ROUNDING`: held-out MSE over the start's, before hard rounding and
  after, and the fraction of offsets still undecided at the end (hard rounding then moves them).
- `recon_steps`: every row reconstructs a block for `fit.iterations` = 500 steps of batch 16; PTQ4DiT's release runs
  20000 steps of batch 32 (`cali_iters`, `cali_batch_size`). One block (`--recon-block`, fp inputs) of a PTQ4DiT
  preset is reconstructed for each of `--recon-steps` (steps x batch) and its held-out block MSE compared.
The first two are the quantized model's output MSE against the fp model on the pool's held-out rows (trajectories
never calibrated on), over the fp outputs' mean square; the last two the block's MSE on the held-out rows over its
round-to-nearest start's: lower is better.

    python benchmarks/deviations.py                 # -> benchmarks/results/deviations/

Each finished measurement is kept under logs/benchmark/deviations/ (keyed by its settings), so an interrupted run
resumes after it.
"""

import argparse
import copy
import dataclasses
import hashlib
import json
import os
import shlex
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from compare_rows import overrides_for, shown
from harness import ROOT, config, fp_blocks, fresh_dir, write_results
from torch import nn

from vq4dit.calibration.model_fit import model_outputs
from vq4dit.calibration.pipeline import default_trainer, quantize_block, quantize_model
from vq4dit.calibration.zero_data import ZeroDataBlockInputs
from vq4dit.cli.build import build_method
from vq4dit.errors import instantiate
from vq4dit.quant.act_quantizer import ActQuantizer, attach_input_quantizer, calibrate_static
from vq4dit.quant.uniform_linear import decode, round_to_nearest

# The layers the block loop leaves in full precision, by where they sit (the deployed block layers are other types)
OUTER = {"patch embedder": "pos_embed.", "timestep MLP": "timestep_embedder.", "final layer": "proj_out_"}
ALL_POINTS = 10**9  # kmeans_points_per_codeword above any layer's sub-vector count: Lloyd on every sub-vector
RELEASED_LENGTH = "20000x32"  # PTQ4DiT's release: cali_iters x cali_batch_size
# PTQ4DiT's rounding as strong as its release's in the table's 500 steps (method settings, a row suffix): the release
# adds 0.01 x the regulariser *summed* over a block's weights to an unnormalised loss, some 1e4-1e6 times the weight
# of this project's 0.01 x mean against a loss normalised to 1; and Adam at lr 1e-3 moves an offset's logit at most
# 0.5 in 500 steps where deciding it takes up to 2.4 (the release's 20000 steps allow 20): lr 0.04 allows 20 in 500
RELEASE_ROUNDING = "reg_weight=10000+lr_rounding=0.04"
CACHE = ROOT / "logs" / "benchmark" / "deviations"  # each finished measurement, so an interrupted run resumes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ptq4dit", default="w8a8,w4a8", help="PTQ4DiT presets measured with and without the embedders")
    p.add_argument("--iterations", type=int, default=50, help="PTQ4DiT's reconstruction steps per block")
    p.add_argument("--kmeans", default="w4,w3,w2", help="VQ presets whose k-means is measured with and without the cap")
    p.add_argument("--recon", default="w4a8", help="PTQ4DiT presets whose reconstruction length is measured")
    p.add_argument("--recon-steps", default=f"500x16,2000x16,{RELEASED_LENGTH}",
                   help="reconstruction lengths compared, steps x batch (the table's first, the release's last)")
    p.add_argument("--rounding", default="w4a8,w8a8",
                   help="PTQ4DiT presets reconstructed with the row's rounding settings and the release's strength")
    p.add_argument("--recon-block", type=int, default=1, help="the block reconstructed (fp inputs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/deviations"))
    args = p.parse_args()
    try:  # before any work: the pool alone is minutes
        lengths = [(int(steps), int(batch)) for steps, batch in (n.split("x") for n in args.recon_steps.split(","))]
        assert all(steps >= 1 and batch >= 1 for steps, batch in lengths)
    except (ValueError, AssertionError):
        p.error(f"--recon-steps {args.recon_steps}; valid: comma-separated <steps>x<batch>, both >= 1 (500x16)")
    out = fresh_dir(Path(args.out))
    torch.set_num_threads(1)  # train.py's default
    device = torch.device("cpu")
    relative, quantized, calibration, heldout_rows = whole_model(args.seed, device)

    rows = []
    for preset in filter(None, args.ptq4dit.split(",")):
        if (row := cached("embedders", preset, args.iterations, args.seed)) is not None:
            rows.append(row)
            continue
        model, seconds = quantized("method=ptq4dit", f"quant={preset}", f"fit.iterations={args.iterations}")
        method = build_method(config("train", "method=ptq4dit", f"quant={preset}"))
        released = {}
        for part, name in (*OUTER.items(), ("all", "")):  # each part alone, then all (the release)
            copied = copy.deepcopy(model)
            layers = [m for n, m in copied.named_modules() if type(m) in (nn.Linear, nn.Conv2d) and name in n]
            quantize_outer_layers(copied, layers, method.quant.bits, method.activation.bits, calibration(), device)
            released[part] = relative(copied)
        rows.append(keep({"deviation": "embedders", "row": f"ptq4dit-{preset}", "as_in_the_table": relative(model),
                          "as_released": released.pop("all"), "one_part_quantized": released, "seconds": seconds},
                         preset, args.iterations, args.seed))
    for preset in filter(None, args.kmeans.split(",")):
        if (row := cached("kmeans_points", preset, None, args.seed)) is not None:
            rows.append(row)
            continue
        measured = {}
        for points in (256, ALL_POINTS):
            model, seconds = quantized("method=kmeans", f"quant={preset}", "method.kmeans_weighting=input_moment",
                                       f"method.kmeans_points_per_codeword={points}")
            measured[points] = relative(model)
        rows.append(keep({"deviation": "kmeans_points", "row": f"kmeans-{preset}+kmeans_weighting=input_moment",
                          "as_in_the_table": measured[256], "as_released": measured[ALL_POINTS], "seconds": seconds},
                         preset, None, args.seed))
    for preset in filter(None, args.recon.split(",")):
        rows.append(recon_steps(preset, lengths, args.recon_block, args.seed, device))
    for preset in filter(None, args.rounding.split(",")):
        rows.append(rounding(preset, args.recon_block, args.seed, device))
    command = "python benchmarks/deviations.py" + "".join(  # the options given, from the parser's own defaults
        f" {a.option_strings[0]} {shlex.quote(str(getattr(args, a.dest)))}" for a in p._actions
        if a.dest not in ("help", "out") and getattr(args, a.dest) != a.default)
    setup = {"command": command, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
             "threads": torch.get_num_threads(), "heldout_rows": heldout_rows,
             "effects": effects(rows, command, args, out)}
    model_rows = [r for r in rows if r["deviation"] in ("embedders", "kmeans_points")]
    lines = [f"Command: `{command}` ({setup['date']}, 1 CPU thread, seed {args.seed})."]
    if model_rows:
        lines[0] += (f" Output MSE of the quantized reference digits DiT against the fp model on the pool's "
                     f"{heldout_rows} held-out rows, over the fp outputs' mean square (lower is better): as the "
                     "comparison's row runs it, and as its authors' release does. PTQ4DiT rows with "
                     f"{args.iterations} reconstruction steps per block (the table's rows: 500).")
        lines += ["", "| deviation | model | as in the table | as released | released / table | "
                  + " | ".join(f"{part} alone" for part in OUTER) + " |",
                  "|---|---|---|---|---|" + "---|" * len(OUTER)]
        lines += [f"| {r['deviation']} | {r['row']} | {r['as_in_the_table']:.4g} | {r['as_released']:.4g} | "
                  f"{r['as_released'] / r['as_in_the_table']:.3f} | "
                  + " | ".join(f"{r['one_part_quantized'][part]:.4g}" if "one_part_quantized" in r else "–"
                               for part in OUTER) + " |" for r in model_rows]
    recon = [r for r in rows if r["deviation"] == "recon_steps"]
    if recon:
        lines += ["", "Reconstruction length (`recon_steps`): PTQ4DiT's held-out MSE of one block (fp inputs) over its "
                  "round-to-nearest start's, per length (steps x batch), and the wall time of each reconstruction.", "",
                  "| model | block | " + " | ".join(r["length"] for r in recon[0]["lengths"]) + " |",
                  "|---|---|" + "---|" * len(recon[0]["lengths"])]
        lines += [f"| {r['row']} | {r['block']} | " + " | ".join(
            f"{m['mse'] / r['start_mse']:.4f} ({m['seconds']:.0f} s)" for m in r["lengths"]) + " |" for r in recon]
    strength = [r for r in rows if r["deviation"] == "rounding"]
    if strength:
        lines += ["", f"Rounding strength (`rounding`): PTQ4DiT's held-out MSE of one block (fp inputs) over its "
                  f"round-to-nearest start's after {strength[0]['length']} steps x batch, before hard rounding (soft "
                  "offsets) and after, and the fraction of offsets still undecided at the end, with the row's "
                  f"settings and with `{RELEASE_ROUNDING}` (the release's strength).", "",
                  "| model | block | settings | before rounding | after rounding | undecided |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['row']} | {r['block']} | {name} | {v['soft_mse'] / r['start_mse']:.4f} | "
                  f"{v['mse'] / r['start_mse']:.4f} | {v['undecided']:.3f} |"
                  for r in strength for name, v in r["settings"].items()]
    write_results(out, rows, "\n".join(lines), setup)
    print((out / "results.md").read_text())


def whole_model(seed: int, device: torch.device):
    """(the relative held-out output error of a model, a quantizer of copies of the fp model, the calibration rows,
    the held-out row count), the pool made on first use (a run of cached or block-only measurements needs none)."""
    made = {}

    def pool():
        if not made:
            cfg = config("train", f"seed={seed}")
            fp = instantiate(cfg.model)
            rows = ZeroDataBlockInputs.of(fp, instantiate(cfg.sampler), instantiate(cfg.pool), seed, progress=False)
            of = lambda part: tuple(r[part] for r in (rows.inputs, rows.timesteps, rows.labels))  # noqa: E731
            heldout = of(rows.heldout_rows)
            made.update(fp=fp, pool=rows, heldout=heldout, calibration=of(slice(0, 256)),
                        target=model_outputs(fp, heldout, device, "fp32"))
        return made

    def relative(model) -> float:
        m = pool()
        out = model_outputs(model, m["heldout"], device, "fp32")
        return (torch.nn.functional.mse_loss(out, m["target"]) / m["target"].square().mean()).item()

    def quantized(*overrides: str):
        m, run_cfg = pool(), config("train", f"seed={seed}", *overrides)
        model, mark = copy.deepcopy(m["fp"]), time.time()
        quantize_model(model, build_method(run_cfg), m["pool"], device=device, seed=seed,
                       fit=instantiate(run_cfg.fit), model_fit=instantiate(run_cfg.model_fit), progress=False)
        return model, round(time.time() - mark, 1)

    cfg = config("train", f"seed={seed}")
    return relative, quantized, lambda: pool()["calibration"], cfg.pool.heldout_size


def recon_steps(preset: str, lengths: list[tuple[int, int]], block: int, seed: int, device: torch.device,
                *overrides: str) -> dict:
    """PTQ4DiT at `preset` on one block (fp inputs), reconstructed for each (steps, batch) of `lengths`, every one from
    the same fp block: the held-out block MSE of each, each length kept as it finishes (the release's takes hours
    here). `overrides` (config keys) shrink it for tests."""
    if (row := cached("recon_steps", preset, lengths, seed, block, *overrides)) is not None:
        return row
    cfg = config("train", f"seed={seed}", "method=ptq4dit", f"quant={preset}", "trainer.enable_progress_bar=false",
                 *overrides)
    data = next(b for b in fp_blocks(cfg) if b.index == block)
    measured = []
    for steps, batch in lengths:
        if (one := cached("recon_length", preset, [steps, batch], seed, block, *overrides)) is None:
            fit = instantiate(cfg.fit)
            fit = dataclasses.replace(fit, iterations=steps, batch_size=batch)
            trainer = default_trainer(device, trainer=instantiate(cfg.trainer))
            mark = time.time()
            _, stats = quantize_block(build_method(cfg), copy.deepcopy(data), fit, trainer)
            one = keep({"deviation": "recon_length", "length": f"{steps}x{batch}", "steps": steps, "batch": batch,
                        "start_mse": stats["start_mse"], "mse": stats["method_mse"],
                        "seconds": round(time.time() - mark, 1)}, preset, [steps, batch], seed, block, *overrides)
        measured.append(one)
    table, released = measured[0], measured[-1]
    return keep({"deviation": "recon_steps", "row": f"ptq4dit-{preset}", "block": block,
                 "start_mse": table["start_mse"], "lengths": measured, "as_in_the_table": table["mse"],
                 "as_released": released["mse"], "seconds": sum(m["seconds"] for m in measured)},
                preset, lengths, seed, block, *overrides)


def rounding(preset: str, block: int, seed: int, device: torch.device, *overrides: str) -> dict:
    """PTQ4DiT at `preset` on one block (fp inputs), reconstructed for the table's `fit` with the row's settings and
    with RELEASE_ROUNDING, both from the same fp block: the held-out block MSE before hard rounding (the student as
    fitted) and after, and the fraction of rounding offsets still undecided. `overrides` shrink it for tests."""
    if (row := cached("rounding", preset, RELEASE_ROUNDING, seed, block, *overrides)) is not None:
        return row
    rows = {"as in the table": f"ptq4dit-{preset}", RELEASE_ROUNDING: f"ptq4dit-{preset}+{RELEASE_ROUNDING}"}
    cfgs = {name: config("train", f"seed={seed}", "trainer.enable_progress_bar=false", *overrides_for(row), *overrides)
            for name, row in rows.items()}
    cfg = cfgs["as in the table"]
    data = next(b for b in fp_blocks(cfg) if b.index == block)  # the same fp block for both: the pool is the row's
    fit = instantiate(cfg.fit)
    measured = {}
    for name, row_cfg in cfgs.items():
        trainers, make = [], default_trainer(device, trainer=instantiate(cfg.trainer))

        def kept_trainer(**kwargs):  # the fitted module is read after quantize_block returns
            trainers.append(make(**kwargs))
            return trainers[-1]

        method, copied = build_method(row_cfg), copy.deepcopy(data)
        _, stats = quantize_block(method, copied, fit, kept_trainer)
        fitted = trainers[-1].lightning_module  # the student as fitted: soft offsets, before finalize rounds them
        measured[name] = {"soft_mse": copied.heldout_mse(fitted.student.to(device)).item(),
                          "mse": stats["method_mse"], "kept": stats["kept"],
                          "undecided": method.curves(fitted.layers)["undecided_fraction"]}
        start_mse = stats["start_mse"]
    return keep({"deviation": "rounding", "row": f"ptq4dit-{preset}", "block": block,
                 "length": f"{fit.iterations}x{fit.batch_size}", "start_mse": start_mse, "settings": measured,
                 "as_in_the_table": measured["as in the table"]["mse"],
                 "as_released": measured[RELEASE_ROUNDING]["mse"]},
                preset, RELEASE_ROUNDING, seed, block, *overrides)


def _path(kind: str, preset: str, iterations, seed: int, *more) -> Path:
    key = hashlib.sha1(json.dumps([kind, preset, iterations, seed, *more]).encode()).hexdigest()[:12]
    return CACHE / f"{kind}-{preset}-{key}.json"


def cached(kind: str, preset: str, iterations, seed: int, *more) -> dict | None:
    """A measurement an earlier, interrupted run of the same settings finished."""
    path = _path(kind, preset, iterations, seed, *more)
    return json.loads(path.read_text()) if path.is_file() else None


def keep(row: dict, preset: str, iterations, seed: int, *more) -> dict:
    """`row` kept under CACHE (temporary name, then renamed), so a rerun resumes after it."""
    path = _path(row["deviation"], preset, iterations, seed, *more)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(row) + "\n")
    os.replace(tmp, path)
    print(row, flush=True)
    return row


def quantize_outer_layers(model, layers: list[nn.Module], bits: int, act_bits: int | None,
                          rows: tuple[torch.Tensor, ...], device: torch.device) -> None:
    """`layers` of `model` (Linears and Convs the block loop left in full precision) quantized in place as PTQ4DiT's
    release does before its reconstruction: weights round to nearest per output channel (asymmetric), inputs static
    per tensor with ranges calibrated on `rows` (after the weights, as the release calibrates activations with its
    weights quantized)."""
    with torch.no_grad():
        for layer in layers:
            w = layer.weight
            q, grid = round_to_nearest(w.reshape(len(w), -1), bits, None, False)
            w.copy_(decode(q, grid).reshape(w.shape))
    if act_bits is None:
        return
    seen = {id(layer): [] for layer in layers}
    hooks = [layer.register_forward_pre_hook(lambda m, args: seen[id(m)].append(args[0].detach().float().cpu()))
             for layer in layers]
    model_outputs(model, rows, device, "fp32")
    for hook in hooks:
        hook.remove()
    for layer in layers:
        values = torch.cat([v.reshape(-1) for v in seen[id(layer)]])
        width = layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels
        quantizer = ActQuantizer(act_bits, "tensor", dynamic=False, width=width)
        calibrate_static(quantizer, values[None])
        attach_input_quantizer(layer, quantizer.to(device))


def effects(rows: list[dict], command: str, args, out: Path) -> dict[str, str]:
    """One sentence per deviation for the table's notes: what it changes, measured by `command`."""
    def ratios(kind: str) -> str:
        return "; ".join(f"{r['row'].split('+')[0]}: {r['as_in_the_table']:.3g} -> {r['as_released']:.3g} "
                         f"({r['as_released'] / r['as_in_the_table']:.2f}x" + (
                             "; one part alone: " + ", ".join(f"{part} {value:.3g}"
                                                            for part, value in r["one_part_quantized"].items())
                             if "one_part_quantized" in r else "") + ")"
                         for r in rows if r["deviation"] == kind)

    where, out = f"{shown(out)}/", {}
    if any(r["deviation"] == "embedders" for r in rows):
        out["embedders"] = (f"Measured (`{command}`, {where}): quantizing those layers as well "
                            "changes the model's held-out output error, relative to the fp output's mean square, "
                            f"{ratios('embedders')} (PTQ4DiT with {args.iterations} reconstruction steps per block, "
                            "those layers round to nearest; the release would also reconstruct them); its effect on "
                            "FID and PSNR is not measured.")
    if any(r["deviation"] == "kmeans_points" for r in rows):
        out["kmeans_points"] = (f"Measured (`{command}`, {where}): k-means on every sub-vector "
                                "instead changes the held-out output error of a data-aware k-means model (VQ4DiT's "
                                f"start), relative to the fp output's mean square, {ratios('kmeans_points')}; its "
                                "effect after VQ4DiT's fit, and on FID and PSNR, is not measured.")
    recon = [r for r in rows if r["deviation"] == "recon_steps"]
    if recon:
        out["recon_steps"] = (
            f"Measured (`{command}`, {where}): PTQ4DiT's held-out MSE of block "
            f"{recon[0]['block']} (fp inputs) over its round-to-nearest start's, by reconstruction length (steps x "
            "batch): " + "; ".join(f"{r['row']}: " + ", ".join(f"{m['length']} {m['mse'] / r['start_mse']:.3f}"
                                                              for m in r["lengths"]) for r in recon)
            + " (above 1: worse than the start, and a block then ships its start)"
            + ("" if any(m["length"] == RELEASED_LENGTH for r in recon for m in r["lengths"])
               else f"; the release's {RELEASED_LENGTH} is not measured")
            + "; its effect on FID and PSNR is not measured.")
    strength = [r for r in rows if r["deviation"] == "rounding"]
    if strength:
        out["rounding"] = (
            f"Measured (`{command}`, {where}): PTQ4DiT's held-out MSE of block {strength[0]['block']} (fp inputs) "
            f"over its round-to-nearest start's after {strength[0]['length']}, before hard rounding -> after, and the "
            "offsets left undecided, with the row's settings / with the release's strength: " + "; ".join(
                f"{r['row']}: " + " / ".join(f"{v['soft_mse'] / r['start_mse']:.3f} -> {v['mse'] / r['start_mse']:.3f}"
                                             f" ({v['undecided']:.0%} undecided)" for v in r["settings"].values())
                for r in strength) + ".")
    return out


if __name__ == "__main__":
    main()
