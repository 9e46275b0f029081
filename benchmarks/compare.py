"""The side-by-side table: every method on the reference digits DiT with one sampler, one eval seed and one
sample count. Per row: FID (with the real-vs-real floor), class accuracy and PSNR against the fp model's samples
from the same noise, each as mean +- sd over calibration seeds; the eval-noise sd of FID (bootstrap over the
samples); bits per weight and bytes counted from the checkpoint file; calibration wall time. Every row is cached
under logs/benchmark/compare-rows/ (keyed by its settings), so the table can be built over several sittings;
it writes results.md, results.json and samples.png (a sample per class for every row, same noise).

    python benchmarks/compare.py                                         # -> benchmarks/results/compare/
    python benchmarks/compare.py --rows rtn-w4g64,vq4dit-w2 --seeds 0 --num-samples 100 --out /tmp/quick
    python benchmarks/compare.py --only-cache --rows gptq-w3g64          # fill the cache (e.g. in parallel)
    python benchmarks/compare.py --from-cache                            # the table from what the cache holds
"""

import argparse
import hashlib
import json
import os
import shutil
import statistics
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import torch
from harness import ROOT, config, fresh_dir, labelled_rows, write_results
from safetensors.torch import load_file, save_file

from vq4dit.calibration.model_fit import resolved
from vq4dit.calibration.pipeline import resolve_student_inputs
from vq4dit.cli.config_schema import validate
from vq4dit.cli.entry import compose, fail
from vq4dit.cli.evaluate import load_model, sample_and_score
from vq4dit.cli.outputs import check_writable
from vq4dit.cli.quantize import build_method, quantize
from vq4dit.errors import UserError, instantiate
from vq4dit.models.embedders import shared_embedders
from vq4dit.quant.checkpoint import TENSORS, VERSION, load_quantized, read_manifest, save_quantized

ROWS = ["rtn-w4pc", "rtn-w4g64", "gptq-w4pc", "gptq-w4g64", "kmeans-w4", "classic_vq-w4", "vq4dit-w4",
        "rtn-w3pc", "rtn-w3g64", "gptq-w3pc", "gptq-w3g64", "kmeans-w3", "classic_vq-w3", "vq4dit-w3",
        "rtn-w2pc", "rtn-w2g64", "gptq-w2pc", "gptq-w2g64", "kmeans-w2", "classic_vq-w2", "vq4dit-w2",
        # weights and activations (act presets: README, "Activation quantization")
        "rtn-w8a8", "ptq4dit-w8a8", "qdit-w6a8", "rtn-w4a8", "gptq-w4a8", "qdit-w4a8", "ptq4dit-w4a8",
        "vq4dit-w3-a8", "vq4dit-w2-a8"]
CACHE = (ROOT / "logs").resolve() / "benchmark" / "compare-rows"  # physical: a worktree may link its logs here
COLLAPSE = "class accuracy below 0.5 or FID above 5x the fp model's"


# Method settings added after rows were cached, at the value that gives the behaviour those rows ran with: a
# cached row is reused only if its manifest records the settings the row resolves to today.
ADDED_SETTINGS = {"kmeans_weighting": "none", "moment_damp": 0.01}


def overrides_for(row: str) -> list[str]:
    """`<method>-<quant preset>[-<act preset>][+<setting>=<value> ...]` -> train.py overrides; a setting without a
    dot is the method's (`vq4dit-w3+candidates=3`), one with a dot is any config key (`+pool.student_inputs=...`)."""
    base, *settings = row.split("+")
    method, quant, *act = base.split("-")
    return [f"method={method}", f"quant={quant}", *(f"act={a}" for a in act),
            *(s if "." in s.split("=")[0] else f"method.{s}" for s in settings)]


def run_settings(manifest: dict) -> dict:
    """What a checkpoint was made with, from its manifest, in the form `row_settings` gives for a config."""
    method = {k: v for k, v in manifest["method"].items() if k not in ("name", "quant", "act")}
    model_fit = manifest.get("model_fit") or {}
    return {"method": manifest["method"]["name"], "quant": manifest["method"]["quant"],
            "act": manifest["method"].get("act"), **{f"method.{k}": v for k, v in method.items()},
            **{f"method.{k}": v for k, v in ADDED_SETTINGS.items() if k not in method},
            "fit": manifest.get("fit"), "model_fit.iterations": model_fit.get("iterations", 0),
            "model_fit.lr": model_fit.get("lr") if model_fit else None,
            "pool.student_inputs": manifest["pool"]["student_inputs"], "seed": manifest["seed"]}


def row_settings(cfg) -> dict:
    """The settings a config resolves to, as `run_settings` reads them from a manifest."""
    method = build_method(cfg)
    record = method.record()
    iterations = resolved(instantiate(cfg.model_fit), method).iterations
    fitted = iterations > 0
    return {"method": record["name"], "quant": record["quant"], "act": record.get("act"),
            **{f"method.{k}": v for k, v in record.items() if k not in ("name", "quant", "act")},
            "fit": asdict(instantiate(cfg.fit)) if method.fits else None, "model_fit.iterations": iterations,
            "model_fit.lr": cfg.model_fit.lr if fitted else None,
            "pool.student_inputs": resolve_student_inputs(cfg.pool.student_inputs, method),
            "seed": cfg.seed}


def stale_settings(manifest: dict, cfg) -> dict:
    """Settings whose recorded value differs from what the row resolves to today ({} when the cache is valid)."""
    recorded, today = run_settings(manifest), row_settings(cfg)
    return {key: (recorded.get(key), value) for key, value in today.items() if recorded.get(key) != value}


def equivalent_run(cfg, num_samples: int) -> dict | None:
    """A cached run of another row name made with exactly these settings (and the same evaluation), if any."""
    for path in sorted(CACHE.glob("*/row.json")):
        run = json.loads(path.read_text())
        if run.get("num_samples") != num_samples or run.get("checkpoint") is None:
            continue
        # where the run's files are now (a superseded row's folder was renamed after its row.json was written)
        run.update(checkpoint=str(path.parent / "train" / "checkpoint"),
                   samples=str(path.parent / "samples.safetensors"))
        if not stale_settings(read_manifest(Path(run["checkpoint"])), cfg):
            return run
    return None


def check_arguments(args) -> tuple[list[str], list[int]]:
    """Every argument before any work (the fp row is minutes): (rows, seeds), or one UserError line."""
    seeds = [s.strip() for s in args.seeds.split(",")]
    if not all(s.isdigit() for s in seeds) or len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds {args.seeds}; valid: distinct non-negative integers separated by commas (0,1)")
    for name, value, low in (("--num-samples", args.num_samples, 2), ("--bootstrap", args.bootstrap, 1),
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


def _shown(path: Path) -> str:
    """A path as the command line that made the table gives it: relative to the repository when inside it."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path.resolve())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default=",".join(ROWS),
                   help="comma-separated <method>-<preset>[-<act>][+<setting>=<value>...]")
    p.add_argument("--seeds", default="0,1,2", help="calibration seeds (methods whose result depends on one)")
    p.add_argument("--num-samples", type=int, default=500)
    p.add_argument("--bootstrap", type=int, default=200, help="resamples for FID's eval-noise sd")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/compare"))
    p.add_argument("--only-cache", action="store_true", help="run the rows (filling the cache), write no table")
    p.add_argument("--from-cache", action="store_true",
                   help="write the table from cached runs only; rows and seeds not run yet are listed, not run")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: reproducible, shares the cores)")
    args = p.parse_args()
    try:
        rows, seeds = check_arguments(args)
    except UserError as e:
        fail(str(e))  # one line on stderr, exit status 2
    torch.set_num_threads(args.threads)
    out = None if args.only_cache else fresh_dir(Path(args.out))
    eval_cfg = config("eval", f"ckpt={ROOT / 'data/dit_digits'}", f"num_samples={args.num_samples}",
                      f"paths.output_dir={CACHE / 'eval'}")
    scorer = instantiate(eval_cfg.metric)
    fp = run_fp(eval_cfg, scorer, args.bootstrap)
    results, not_run = {"fp32": [fp]}, []
    for row in rows:
        method_seeds = seeds if build_method(config("train", *overrides_for(row))).seeded else seeds[:1]
        runs = [run_row(row, seed, eval_cfg, scorer, fp, args.bootstrap, cached_only=args.from_cache)
                for seed in method_seeds]
        not_run += [f"{row} seed {seed}" for seed, run in zip(method_seeds, runs) if run is None]
        if any(runs):
            results[row] = [run for run in runs if run is not None]
            print(row_md(row, results[row], fp), flush=True)
    if out is None:
        return
    for runs in results.values():  # sizes in today's checkpoint format, whatever format a cached row was made in
        for run in runs:
            run["checkpoint_bytes"] = checkpoint_bytes(run)
    summary = {name: summarize(runs) for name, runs in results.items()}
    figure = [(name, load_file(runs[0]["samples"])["images"].float()) for name, runs in results.items()]
    labelled_rows(figure, load_file(fp["samples"])["labels"]).save(out / "samples.png")
    command = "python benchmarks/compare.py" + ("" if args.rows == ",".join(ROWS) else f" --rows {args.rows}") + (
        "" if args.seeds == "0,1,2" else f" --seeds {args.seeds}") + (
        "" if args.num_samples == 500 else f" --num-samples {args.num_samples}") + (
        " --from-cache" if args.from_cache else "") + (
        "" if Path(args.out).resolve() == ROOT / "benchmarks/results/compare"
        else f" --out {_shown(Path(args.out))}")
    setup = {"command": command, "not_run": not_run,
             "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "num_samples": args.num_samples,
             "calibration_seeds": seeds, "eval_seed": eval_cfg.seed, "threads": torch.get_num_threads(),
             "sampler": "DDPM 100 steps, guidance 2 (configs/sampler/ddpm.yaml)", "collapse": COLLAPSE}
    lines = [f"Command: `{setup['command']}` ({setup['date']}, {setup['threads']} CPU threads). {args.num_samples} "
             f"samples per run, {setup['sampler']}, eval seed {eval_cfg.seed}; calibration seeds {args.seeds} "
             f"(mean +- sd over them; one run where the result does not depend on the seed). FID on the digits "
             f"classifier's features; real-vs-real floor at this sample count {fp['fid_floor']:.2f}; 'eval sd' is "
             "FID's bootstrap sd over the samples of one run. Collapse (x): " + COLLAPSE + ".", "",
             "| row | bits/weight (file) | activations | FID | eval sd | class acc. | PSNR vs fp (dB) | "
             "checkpoint KiB | "
             "calibration s |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [row_md(name, runs, fp) for name, runs in results.items()]
    if not_run:
        lines += ["", "Not run yet (the table holds the others): " + ", ".join(not_run) + "."]
    write_results(out, [{"row": name, **summary[name], "runs": runs} for name, runs in results.items()],
                  "\n".join(lines), setup)
    print((out / "results.md").read_text())


def run_fp(eval_cfg, scorer, reps: int) -> dict:
    folder = CACHE / f"fp32-{_digest(['fp32'], 0, eval_cfg)}"
    if (folder / "row.json").exists():
        return json.loads((folder / "row.json").read_text())
    model = load_model(eval_cfg.model, eval_cfg.ckpt)
    images, labels, metrics = sample_and_score(eval_cfg, model)
    params = sum(p.numel() for p in model.transformer.parameters())
    row = {**metrics, "fid_eval_sd": fid_bootstrap_sd(scorer, images, reps), "bits": 32.0,
           "checkpoint_bytes": 4 * params, "calibration_s": None, "checkpoint": None}
    return _store(folder, row, images, labels)


def run_row(row: str, seed: int, eval_cfg, scorer, fp: dict, reps: int, cached_only: bool = False) -> dict | None:
    folder = CACHE / f"{row.replace('+', '_').replace('=', '-')}-s{seed}-{_digest(overrides_for(row), seed, eval_cfg)}"
    cfg = config("train", *overrides_for(row), f"seed={seed}", f"paths.output_dir={folder / 'train'}",
                 f"paths.log_dir={folder / 'logs'}", "resume=false", "log_samples=0",
                 "trainer.enable_progress_bar=false")
    if (folder / "row.json").exists():
        cached = json.loads((folder / "row.json").read_text())
        stale = stale_settings(read_manifest(Path(cached["checkpoint"])), cfg)
        if not stale:
            return cached
        print(f"{row} seed {seed}: cached with other settings (recorded, now): {stale}", flush=True)
        if not cached_only:
            # kept, not overwritten
            os.replace(folder, folder.with_name(f"{folder.name}-superseded-{int(time.time())}"))
    same = equivalent_run(cfg, eval_cfg.num_samples)  # e.g. a default row run earlier under its settings' names
    if same is not None:
        return same
    if cached_only:
        return None
    shutil.rmtree(folder, ignore_errors=True)  # a row interrupted before its row.json: start it again
    start = time.time()
    ckpt = quantize(cfg)
    wall = time.time() - start
    manifest = read_manifest(ckpt)
    images, labels, metrics = sample_and_score(eval_cfg, load_quantized(ckpt, cfg.model),
                                               compare_to=load_file(fp["samples"])["images"].float())
    blocks = manifest["blocks"]
    result = {**metrics, "seed": seed, "fid_eval_sd": fid_bootstrap_sd(scorer, images, reps),
              "bits": manifest["sizes"]["blocks_bits_per_weight"], "checkpoint_bytes": os.path.getsize(ckpt / TENSORS),
              "calibration_s": round(wall, 1), "checkpoint": str(ckpt),
              "activations": activations_label(manifest["method"].get("act")),
              "kept_start_blocks": sum(b["kept"] == "start" for b in blocks) if "method_mse" in blocks[0] else None,
              "shipped_block_mse": statistics.mean(b["shipped_mse"] for b in blocks)}
    return _store(folder, result, images, labels)


def checkpoint_bytes(run: dict) -> int:
    """Bytes of the tensor file in the current checkpoint format (a row made in an older format is re-saved once,
    next to its checkpoint); for the fp model, its fp32 parameters with diffusers' per-block embedder copies once."""
    if run.get("checkpoint") is None:
        model = load_model(config("eval", f"ckpt={ROOT / 'data/dit_digits'}").model, str(ROOT / "data/dit_digits"))
        aliases = tuple(f"{alias}." for alias in shared_embedders(model.transformer))
        return 4 * sum(p.numel() for n, p in model.transformer.named_parameters() if not n.startswith(aliases))
    ckpt = Path(run["checkpoint"])
    manifest = read_manifest(ckpt)
    if manifest["version"] != VERSION:
        current = ckpt.with_name("checkpoint-current")
        if not current.exists():
            save_quantized(load_quantized(ckpt), current, manifest)
        ckpt = current
    return os.path.getsize(ckpt / TENSORS)


def activations_label(act: dict | None) -> str:
    """How a row quantizes activations, from its manifest: bits, granularity, static or dynamic."""
    if act is None:
        return "fp32"
    groups = act["group_size"] or "the searched sizes"
    granularity = {"tensor": "per tensor", "token": "per token", "token_group": f"per token, groups of {groups}"}
    granularity = granularity[act["granularity"]]
    return f"A{act['bits']}, {granularity}, {'dynamic' if act['dynamic'] else 'static'}"


def fid_bootstrap_sd(scorer, images: torch.Tensor, reps: int, seed: int = 0) -> float:
    """sd of FID over `reps` resamplings (with replacement) of the generated images: the eval noise of one run."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    features = torch.cat([scorer.features(((b + 1) / 2).to(scorer.device)).cpu() for b in images.split(256)])
    real = torch.cat([scorer.features(b.to(scorer.device)).cpu() for b in scorer.reference.split(256)])
    identity = _Identity(features.shape[1])
    fid = FrechetInceptionDistance(feature=identity, reset_real_features=False)
    fid.update(real, real=True)
    gen = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(reps):
        fid.reset()
        fid.update(features[torch.randint(len(features), (len(features),), generator=gen)], real=False)
        values.append(fid.compute().item())
    return statistics.stdev(values)


class _Identity(torch.nn.Module):
    """torchmetrics' FID fed features computed once (its `feature` module sees them as its input)."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, x):
        return x


def summarize(runs: list[dict]) -> dict:
    out = {}
    for key in ("fid", "class_accuracy", "psnr_vs_reference", "fid_eval_sd", "calibration_s"):
        values = [r[key] for r in runs if r.get(key) is not None]
        if values:
            out[key] = statistics.mean(values)
            out[f"{key}_sd"] = statistics.stdev(values) if len(values) > 1 else None
    out.update(bits=runs[0]["bits"], checkpoint_bytes=runs[0]["checkpoint_bytes"], runs_count=len(runs))
    return out


def row_md(name: str, runs: list[dict], fp: dict) -> str:
    s = summarize(runs)
    pm = lambda key, fmt: ("–" if key not in s else format(s[key], fmt)  # noqa: E731
                           + ("" if s.get(f"{key}_sd") is None else f" ± {format(s[f'{key}_sd'], fmt)}"))
    collapsed = s["class_accuracy"] < 0.5 or s["fid"] > 5 * fp["fid"]
    calib = "–" if "calibration_s" not in s else f"{s['calibration_s']:.0f}"
    activations = runs[0].get("activations", "fp32")  # rows cached before activations were recorded: weight-only
    return (f"| {name}{' (x)' if collapsed else ''} | {s['bits']:.3g} | {activations} | {pm('fid', '.2f')} | "
            f"{s['fid_eval_sd']:.2f} | "
            f"{pm('class_accuracy', '.3f')} | {pm('psnr_vs_reference', '.1f')} | {s['checkpoint_bytes'] / 1024:.0f} | "
            f"{calib} |")


def _digest(overrides: list[str], seed: int, eval_cfg) -> str:
    keyed = {"overrides": overrides, "seed": seed, "num_samples": eval_cfg.num_samples, "eval_seed": eval_cfg.seed,
             "sampler": {k: v for k, v in eval_cfg.sampler.items() if k != "device"}}
    return hashlib.sha1(json.dumps(keyed, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _store(folder: Path, row: dict, images: torch.Tensor, labels: torch.Tensor) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"images": images.half().contiguous(), "labels": labels.contiguous()}, folder / "samples.safetensors")
    row = {**row, "samples": str(folder / "samples.safetensors")}
    tmp = folder / "row.json.tmp"
    tmp.write_text(json.dumps(row, indent=2, default=str) + "\n")
    os.replace(tmp, folder / "row.json")  # written last: a row without it is rerun
    return row


if __name__ == "__main__":
    main()
