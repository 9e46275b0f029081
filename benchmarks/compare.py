"""The side-by-side table: every method on the reference digits DiT with one sampler, one eval seed and one
sample count. Per row: FID (with the real-vs-real floor), class accuracy and PSNR against the fp model's samples
from the same noise, each as mean +- sd over calibration seeds; the eval-noise sd of FID (bootstrap over the
samples); bits per weight and bytes counted from the checkpoint file; calibration wall time; and, against the row
above, which differences are real (a paired bootstrap over the samples, paired_bootstrap.py). Every row is kept as
a record made by one version of the code (compare_rows.py), so the table can be built over several sittings and is
only ever built from rows today's code made; it writes results.md, results.json and samples.png (a sample per class
for every row, same noise).

    python benchmarks/compare.py                                         # -> benchmarks/results/compare/
    python benchmarks/compare.py --rows rtn-w4g64,vq4dit-w2 --seeds 0 --num-samples 100 --out /tmp/quick
    python benchmarks/compare.py --only-cache --rows gptq-w3g64          # make records (e.g. in parallel)
    python benchmarks/compare.py --from-cache                            # the table from today's code's records
"""

import argparse
import json
import statistics
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import torch
from compare_rows import (
    CHECKPOINTS,
    CODE,
    RECORDS,
    Code,
    Records,
    eval_settings,
    fp_name,
    make_fp,
    make_row,
    overrides_for,
    per_sample,
    record_name,
    row_settings,
    shown,
    train_config,
)
from deviations import RELEASE_ROUNDING
from harness import ROOT, config, fresh_dir, labelled_rows, write_results
from paired_bootstrap import (
    RealSide,
    check_paired,
    differences,
    excludes_zero,
    resamples,
    row_statistics,
    run_statistics,
)

from vq4dit.cli.config_schema import validate
from vq4dit.cli.entry import compose, fail
from vq4dit.cli.outputs import check_writable
from vq4dit.cli.quantize import build_method
from vq4dit.errors import UserError, instantiate

SEQUENTIAL = "pool.student_inputs=quantized"  # Hessians on the quantized earlier blocks' outputs, as GPTQ's authors
ROWS = ["rtn-w4pc", "rtn-w4g64", "gptq-w4pc", "gptq-w4g64", "kmeans-w4", "classic_vq-w4", "vq4dit-w4",
        "rtn-w3pc", "rtn-w3g64", "gptq-w3pc", "gptq-w3g64", f"gptq-w3g64+{SEQUENTIAL}", "kmeans-w3", "classic_vq-w3",
        "vq4dit-w3",
        "rtn-w2pc", "rtn-w2g64", "gptq-w2pc", "gptq-w2g64", f"gptq-w2g64+{SEQUENTIAL}", "kmeans-w2", "classic_vq-w2",
        "vq4dit-w2",
        # weights and activations (act presets: README, "Activation quantization")
        "rtn-w8a8", "ptq4dit-w8a8", f"ptq4dit-w8a8+{RELEASE_ROUNDING}", "qdit-w6a8", "rtn-w4a8", "gptq-w4a8",
        "qdit-w4a8", "ptq4dit-w4a8", f"ptq4dit-w4a8+{RELEASE_ROUNDING}", "vq4dit-w3-a8", "vq4dit-w2-a8"]
# Pairs the README's reading (who beats whom) and docs/vq4dit.md's ablation compare that are not neighbours in the
# table: each gets the same paired bootstrap as neighbouring rows, listed under the table when both rows are in it
HEAD_TO_HEAD = [("gptq-w4g64", "vq4dit-w4"), ("gptq-w3g64", "vq4dit-w3"), ("gptq-w2g64", "vq4dit-w2"),
                (f"gptq-w2g64+{SEQUENTIAL}", "vq4dit-w2"), ("gptq-w2pc", "vq4dit-w2"), ("classic_vq-w3", "vq4dit-w3"),
                ("classic_vq-w2", "vq4dit-w2"), ("rtn-w4g64", "gptq-w4g64"), ("rtn-w3g64", "gptq-w3g64"),
                ("rtn-w2g64", "gptq-w2g64"), ("rtn-w8a8", "ptq4dit-w8a8"), ("rtn-w4a8", "ptq4dit-w4a8"),
                ("gptq-w4a8", "qdit-w4a8"), ("vq4dit-w2", "vq4dit-w2-a8"), ("vq4dit-w3", "vq4dit-w3-a8"),
                ("rtn-w8a8", f"ptq4dit-w8a8+{RELEASE_ROUNDING}"), ("rtn-w4a8", f"ptq4dit-w4a8+{RELEASE_ROUNDING}"),
                ("gptq-w4a8", f"ptq4dit-w4a8+{RELEASE_ROUNDING}"), ("qdit-w4a8", f"ptq4dit-w4a8+{RELEASE_ROUNDING}")]
# the ablation: each of VQ4DiT's choices left out against the default; classic VQ given VQ4DiT's new defaults
CLASSIC_NEW = "kmeans_weighting=input_moment+pool.student_inputs=quantized+model_fit.iterations=500"
HEAD_TO_HEAD += [("vq4dit-w3", f"vq4dit-w3+{choice}") for choice in (
    "kmeans_weighting=none", "ratio_init=uniform", "candidates=3", "regularizer=code", "codebook_training=after_freeze",
    "harden_at=1.0")] + [("vq4dit-w2", "vq4dit-w2+harden_at=1.0")] + [
    pair for w in ("w3", "w2") for pair in ((f"classic_vq-{w}", f"classic_vq-{w}+{CLASSIC_NEW}"),
                                             (f"classic_vq-{w}+{CLASSIC_NEW}", f"vq4dit-{w}"))]
COLLAPSE = "class accuracy below 0.5 or FID above 5x the fp model's"
REAL = "†"  # a value whose difference from the row above is real (its 95 % paired interval excludes 0)
# Where rows depart from their authors' releases beyond what a row's name says; each note ends with its measured
# effect from benchmarks/deviations.py's committed results (or says it is not measured).
DEVIATIONS = {
    "embedders": "PTQ4DiT (like every row here) keeps the patch, timestep and label embedders and the final layer in "
                 "full precision and quantizes the block linears only; its authors' release quantizes every Linear "
                 "and Conv, those included (weights per channel, inputs static per tensor).",
    "kmeans_points": "k-means (plain k-means, and the start of classic VQ and VQ4DiT) runs Lloyd on a seeded subset "
                     "of at most 256 sub-vectors per codeword (`method.kmeans_points_per_codeword`, faiss's cap), "
                     "then assigns every sub-vector; VQ4DiT's released code runs it on all of a layer's sub-vectors.",
    "block_inputs": "GPTQ and Q-DiT take their Hessians on the fp model's block inputs (`pool.student_inputs=fp`); "
                    "both authors take them on the outputs of the already-quantized earlier blocks, as the rows "
                    "`gptq-...+pool.student_inputs=quantized` do.",
    "rounding": "PTQ4DiT's rounding regulariser weighs 0.01 x its mean over a block's weights against the block loss "
                "normalised to 1, and the rounding offsets learn at lr 1e-3 (`method.reg_weight`, "
                "`method.lr_rounding`); its authors' release adds 0.01 x the regulariser summed over the block's "
                "weights to an unnormalised loss (some 1e4-1e6 times stronger here) and runs 40 times the steps. The "
                f"rows `ptq4dit-...+{RELEASE_ROUNDING}` give the rounding the release's strength within 500 steps.",
    "recon_steps": "PTQ4DiT (like every fitting row) reconstructs each block for 500 steps of batch 16 (`fit`, the "
                   "design card's); its authors' release runs 20000 steps of batch 32 (`cali_iters`, "
                   "`cali_batch_size`).",
}
# benchmarks/deviations.py's committed runs (one folder per run: deviations/, deviations-recon/, ...; the newest
# run of a deviation is quoted)
DEVIATION_RESULTS = ROOT / "benchmarks/results"
BLOCK_INPUT_RESULTS = ROOT / "benchmarks/results/gptq-inputs/results.json"  # benchmarks/gptq_inputs.py


def check_arguments(args) -> tuple[list[str], list[int]]:
    """Every argument before any work (the fp row is minutes): (rows, seeds), or one UserError line."""
    seeds = [s.strip() for s in args.seeds.split(",")]
    if not all(s.isdigit() for s in seeds) or len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds {args.seeds}; valid: distinct non-negative integers separated by commas (0,1)")
    for name, value, low in (("--num-samples", args.num_samples, 2), ("--bootstrap", args.bootstrap, 2),
                             ("--threads", args.threads, 1)):
        if value < low:
            raise UserError(f"{name} {value}; valid: an integer >= {low}")
    if args.only_cache and args.from_cache:
        raise UserError("--only-cache with --from-cache: the first runs rows, the second only reads them; give one")
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    if not rows:
        raise UserError(f"--rows {args.rows!r}; valid: comma-separated <method>-<preset>[-<act>][+<setting>=<value>]")
    for row in rows:
        try:
            cfg = compose(ROOT / "configs", "train", overrides_for(row))
            validate(cfg)
            build_method(cfg)
        except UserError as e:
            raise UserError(f"--rows: {row}: {e}") from None
        except ValueError:  # a row name that is not <method>-<preset>
            raise UserError(f"--rows: {row}; valid: <method>-<preset>[-<act>][+<setting>=<value>...]") from None
    if not args.only_cache:
        check_writable(Path(args.out), "--out")
    return rows, [int(s) for s in seeds]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default=",".join(ROWS),
                   help="comma-separated <method>-<preset>[-<act>][+<setting>=<value>...]")
    p.add_argument("--seeds", default="0,1,2", help="calibration seeds (methods whose result depends on one)")
    p.add_argument("--num-samples", type=int, default=500)
    p.add_argument("--bootstrap", type=int, default=1000,
                   help="resamples of the eval samples: FID's eval sd and the paired intervals")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/compare"))
    p.add_argument("--records", default=str(RECORDS), help="where the rows' records are read and written")
    p.add_argument("--only-cache", action="store_true", help="make the rows' records, write no table")
    p.add_argument("--from-cache", action="store_true",
                   help="write the table from today's code's records only; rows without one are listed, not run")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: reproducible, shares the cores)")
    args = p.parse_args()
    try:
        rows, seeds = check_arguments(args)
    except UserError as e:
        fail(str(e))  # one line on stderr, exit status 2
    torch.set_num_threads(args.threads)
    records = Records(Path(args.records), Code())
    eval_cfg = config("eval", f"ckpt={ROOT / 'data/dit_digits'}", f"num_samples={args.num_samples}",
                      f"paths.output_dir={CHECKPOINTS / 'eval'}")
    fp = records.valid(fp_name(eval_cfg))
    if fp is None:
        stale = records.stale(fp_name(eval_cfg))
        if args.from_cache:
            fail(f"--from-cache: {records.folder} holds no fp32 record made by {records.code.describe()}"
                 + (f" (its fp32 record is {stale})" if stale else "") + "; make the records first (--only-cache)")
        if stale:
            print(f"fp32: {stale}", flush=True)
    out = None if args.only_cache else fresh_dir(Path(args.out))
    scorer = instantiate(eval_cfg.metric)
    fp = fp or make_fp(eval_cfg, records, scorer)
    results, missing = {"fp32": [fp]}, []
    for row in rows:
        method_seeds = seeds if build_method(config("train", *overrides_for(row))).seeded else seeds[:1]
        runs = []
        for seed in method_seeds:
            run, why = row_run(row, seed, eval_cfg, fp, records, scorer, cached_only=args.from_cache)
            if run is None:
                missing.append(f"{row} seed {seed} ({why})")
            else:
                runs.append(run)
        if runs:
            results[row] = runs
            print(f"{row}: {', '.join(f'{k} {summarize(runs)[k]:.4g}' for k in ('fid', 'psnr_vs_reference'))}",
                  flush=True)
    if out is not None:
        write_table(out, args, results, missing, records, scorer, eval_cfg.seed, seeds)
        print((out / "results.md").read_text())


def row_run(row: str, seed: int, eval_cfg, fp: dict, records: Records, scorer, cached_only: bool
            ) -> tuple[dict | None, str]:
    """(today's code's record of `row` at `seed`, made now unless `cached_only`; or None and why there is none)."""
    name = record_name(row, seed, eval_cfg)
    record = records.valid(name)
    if record is not None:
        return record, ""
    cfg = train_config(row, seed, eval_cfg, records)
    settings = row_settings(cfg)
    same = records.equivalent(settings, eval_settings(eval_cfg))  # e.g. a default spelled out by another name
    if same is not None:
        return same, ""
    stale = records.stale(name, settings)
    if stale:
        print(f"{row} seed {seed}: {stale}", flush=True)
    if cached_only:
        return None, "stale" if stale else "not run"
    return make_row(row, seed, eval_cfg, fp, records, scorer, cfg), ""


def write_table(out: Path, args, results: dict[str, list[dict]], missing: list[str], records: Records, scorer,
                eval_seed: int, seeds: list[int]) -> None:
    names = list(results)
    neighbours = list(zip(names, names[1:]))
    contests = [(a, b) for a, b in HEAD_TO_HEAD if a in results and b in results and (a, b) not in neighbours]
    eval_sd, diffs = bootstrap(results, scorer, args.bootstrap, neighbours + contests)
    pairs, head_to_head = diffs[:len(neighbours)], diffs[len(neighbours):]
    real_vs_above = {below: {k for k, interval in diff.items() if excludes_zero(interval)} for _, below, diff in pairs}
    fp = results["fp32"][0]
    figure = [(name, per_sample(results[name][0])["figure"].float()) for name in names]
    labelled_rows(figure, per_sample(fp)["figure_labels"]).save(out / "samples.png")
    command = command_line(args)
    code = records.code
    made_at = Counter(_commit_of(run) for runs in results.values() for run in runs)
    setup = {"command": command, "not_run": missing,
             "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "num_samples": args.num_samples,
             "calibration_seeds": seeds, "eval_seed": eval_seed, "threads": torch.get_num_threads(),
             "sampler": "DDPM 100 steps, guidance 2 (configs/sampler/ddpm.yaml)", "collapse": COLLAPSE,
             "code": code.digest, "code_files": list(CODE), "commit": code.git["commit"],
             "modified": code.git["modified"], "rows_made_at": dict(made_at), "bootstrap": args.bootstrap,
             "differences": [{"above": a, "below": b, **{k: list(v) for k, v in d.items()}} for a, b, d in pairs],
             "head_to_head": [{"above": a, "below": b, **{k: list(v) for k, v in d.items()}}
                              for a, b, d in head_to_head],
             "deviations": deviation_notes()}
    lines = [f"Command: `{setup['command']}` ({setup['date']}, {setup['threads']} CPU threads). {args.num_samples} "
             f"samples per run, {setup['sampler']}, eval seed {eval_seed}; calibration seeds {args.seeds} "
             f"(mean +- sd over them; one run where the result does not depend on the seed). FID on the digits "
             f"classifier's features; real-vs-real floor at this sample count {fp['fid_floor']:.2f}; 'eval sd' is "
             f"FID's bootstrap sd over the samples of one run ({args.bootstrap} resamples). Collapse (x): "
             f"{COLLAPSE}.", "",
             f"Code: every row was made by code {code.digest}, the digest of {', '.join(CODE)} (why these: "
             f"benchmarks/compare_rows.py); the table was written at {code.describe()}. Rows made at: "
             + ", ".join(f"{where} ({n} runs)" for where, n in made_at.most_common()) + ".", "",
             f"{REAL}: differs from the row above beyond the eval noise: the 95 % interval of the difference, from a "
             f"paired bootstrap over the samples (the same {args.bootstrap} resamples of sample indices in every row: "
             "same noise, same labels), excludes 0. The interval holds the eval noise only, not the spread over "
             "calibration seeds (the ±); the intervals are listed under the table.", "",
             "| row | bits/weight (file) | activations | FID | eval sd | class acc. | PSNR vs fp (dB) | "
             "checkpoint KiB | calibration s |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [row_md(name, results[name], fp, eval_sd[name], real_vs_above.get(name, set())) for name in names]
    lines += ["", "Differences from the row above (this row minus the row above; 95 % paired-bootstrap interval):", "",
              "| row | FID | class acc. | PSNR vs fp (dB) |", "|---|---|---|---|"]
    lines += [difference_md(above, below, diff, results) for above, below, diff in pairs]
    if head_to_head:
        lines += ["", "Head to head: pairs the README and docs/vq4dit.md compare that are not neighbours above (the "
                  f"second row minus the first; the same paired bootstrap; {REAL}: the interval excludes 0):", "",
                  "| rows | FID | class acc. | PSNR vs fp (dB) |", "|---|---|---|---|"]
        lines += [difference_md(above, below, diff, results) for above, below, diff in head_to_head]
    lines += ["", "Deviations from the authors' releases: " + " ".join(setup["deviations"].values())]
    if missing:
        lines += ["", "Not in the table (no record made by this code: stale or not run): " + ", ".join(missing) + "."]
    rows = [{"row": name, **summarize(runs), "fid_eval_sd": eval_sd[name],
             "runs": [{k: shown(v) if k == "folder" else v for k, v in run.items() if k != "settings"} for run in runs]}
            for name, runs in results.items()]
    write_results(out, rows, "\n".join(lines), setup)


def bootstrap(results: dict[str, list[dict]], scorer, reps: int, pairs: list[tuple[str, str]]
              ) -> tuple[dict[str, float], list[tuple[str, str, dict[str, tuple[float, float]]]]]:
    """FID's eval sd of every row (mean over its runs) and, for every pair (a, b) of rows, the paired 95 % intervals
    of b minus a: one set of resamples of the sample indices for all rows."""
    data = {name: [per_sample(run) for run in runs] for name, runs in results.items()}
    check_paired([run for runs in data.values() for run in runs])
    indices = resamples(len(data["fp32"][0]["labels"]), reps)
    real = RealSide(scorer.real_features()["reference"])
    per_run = {name: [run_statistics(run, real, indices) for run in runs] for name, runs in data.items()}
    eval_sd = {name: statistics.mean(s["fid"].std().item() for s in stats) for name, stats in per_run.items()}
    stats = {name: row_statistics(runs) for name, runs in per_run.items()}
    return eval_sd, [(above, below, differences(stats[above], stats[below])) for above, below in pairs]


def command_line(args) -> str:
    """The command that made the table, its defaults left out."""
    return "python benchmarks/compare.py" + ("" if args.rows == ",".join(ROWS) else f" --rows {args.rows}") + (
        "" if args.seeds == "0,1,2" else f" --seeds {args.seeds}") + (
        "" if args.num_samples == 500 else f" --num-samples {args.num_samples}") + (
        "" if args.bootstrap == 1000 else f" --bootstrap {args.bootstrap}") + (
        " --from-cache" if args.from_cache else "") + (
        "" if Path(args.out).resolve() == ROOT / "benchmarks/results/compare" else f" --out {shown(Path(args.out))}"
    ) + ("" if Path(args.records).resolve() == RECORDS else f" --records {shown(Path(args.records))}")


def deviation_notes() -> dict[str, str]:
    """Each deviation with its measured effect (benchmarks/deviations.py's committed results), or 'not measured'."""
    runs = sorted((json.loads(path.read_text()) for path in DEVIATION_RESULTS.glob("deviations*/results.json")),
                  key=lambda run: run["date"])  # a later run of a deviation supersedes an earlier one
    measured = {key: text for run in runs for key, text in run["effects"].items()}
    if BLOCK_INPUT_RESULTS.is_file():
        measured["block_inputs"] = block_inputs_effect(json.loads(BLOCK_INPUT_RESULTS.read_text())["rows"])
    return {key: f"{text} {measured.get(key, 'Its effect is not measured.')}" for key, text in DEVIATIONS.items()}


def block_inputs_effect(runs: list[dict]) -> str:
    """The measured effect of quantized block inputs on the table's GPTQ and Q-DiT rows, from gptq_inputs.py's runs."""
    mse = {(r["row"], r["seed"], r["student_inputs"]): r["output_mse"] for r in runs}
    parts = []
    for row in (name for name in ROWS if name.startswith(("gptq-", "qdit-"))):
        ratios = [f"{mse[row, seed, 'quantized'] / mse[row, seed, 'fp']:.2f}x" for seed in (0, 1)
                  if (row, seed, "quantized") in mse and (row, seed, "fp") in mse]
        if ratios:
            parts.append(f"{row} {' / '.join(ratios)}")
    if not parts:
        return "Its effect is not measured."
    return ("Measured (benchmarks/gptq_inputs.py, whole-model output error on held-out rows, quantized inputs over fp "
            f"ones, seeds 0 / 1): {'; '.join(parts)}; the other rows not measured.")


def summarize(runs: list[dict]) -> dict:
    out = {}
    for key in ("fid", "class_accuracy", "psnr_vs_reference", "calibration_s"):
        values = [r[key] for r in runs if r.get(key) is not None]
        if values:
            out[key] = statistics.mean(values)
            out[f"{key}_sd"] = statistics.stdev(values) if len(values) > 1 else None
    out.update(bits=runs[0]["bits"], checkpoint_bytes=runs[0]["checkpoint_bytes"], runs_count=len(runs))
    return out


def row_md(name: str, runs: list[dict], fp: dict, eval_sd: float, real: set[str]) -> str:
    s = summarize(runs)
    pm = lambda key, fmt: ("–" if key not in s else format(s[key], fmt)  # noqa: E731
                           + ("" if s.get(f"{key}_sd") is None else f" ± {format(s[f'{key}_sd'], fmt)}")
                           + (f" {REAL}" if key in real else ""))
    collapsed = s["class_accuracy"] < 0.5 or s["fid"] > 5 * fp["fid"]
    calib = "–" if "calibration_s" not in s else f"{s['calibration_s']:.0f}"
    return (f"| {name}{' (x)' if collapsed else ''} | {s['bits']:.3g} | {runs[0]['activations']} | "
            f"{pm('fid', '.2f')} | {eval_sd:.2f} | {pm('class_accuracy', '.3f')} | {pm('psnr_vs_reference', '.1f')} | "
            f"{s['checkpoint_bytes'] / 1024:.0f} | {calib} |")


def difference_md(above: str, below: str, diff: dict[str, tuple[float, float]], results: dict) -> str:
    """One line of the differences: the table's difference (below minus above) and its interval."""
    def cell(key: str, fmt: str) -> str:
        if key not in diff:
            return "–"
        point = summarize(results[below])[key] - summarize(results[above])[key]
        low, high = diff[key]
        return f"{point:+{fmt}} [{low:+{fmt}}, {high:+{fmt}}]{f' {REAL}' if excludes_zero(diff[key]) else ''}"

    return (f"| {below} − {above} | {cell('fid', '.2f')} | {cell('class_accuracy', '.3f')} | "
            f"{cell('psnr_vs_reference', '.2f')} |")


def _commit_of(run: dict) -> str:
    if not run.get("commit"):
        return "no git checkout"
    return run["commit"][:10] + (" with uncommitted changes" if run.get("modified") else "")


if __name__ == "__main__":
    main()
