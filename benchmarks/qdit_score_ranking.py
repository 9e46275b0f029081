"""Which cheap score ranks Q-DiT's group-size candidates like the full evaluation?

Candidates are what the search scores: the reference digits DiT with RTN weights at the candidate's group sizes
and dynamic token-group activations at the same sizes (search/candidate_score.py), here at W4A8. They are the
four uniform candidates of the scaled space (groups 8, 16, 32 = the base, 64) and random legal candidates under
the bit-operations budget, drawn as the search draws them. Every candidate gets every cheap score exactly as the
search computes it (its own noise stream) and the full evaluation (eval.py's protocol: 500 samples, the eval
noise stream); the table gives Spearman's rank correlation of each cheap score with the full FID, and with the
full PSNR against the fp model's samples.

    python benchmarks/qdit_score_ranking.py            # -> benchmarks/results/qdit-score-ranking/
    python benchmarks/qdit_score_ranking.py --random 2 --full-samples 200 --out /tmp/ranking   # quicker

Every scored candidate (and the fp model's evaluation) is cached under logs/benchmark/qdit-score-ranking/, keyed
by its settings, so an interrupted run, or one with more random candidates, reuses what was measured.
"""

import argparse
import hashlib
import json
import os
import random
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from harness import ROOT, config, fresh_dir, write_results
from safetensors.torch import load_file, save_file
from scipy.stats import spearmanr

from vq4dit.calibration.zero_data import ZeroDataBlockInputs
from vq4dit.cli.evaluate import sample_and_score
from vq4dit.cli.quantize import build_method
from vq4dit.errors import instantiate
from vq4dit.quant.block_layers import block_linears
from vq4dit.search.candidate_score import CandidateScore, candidate_model
from vq4dit.search.evolution import EvolutionSearch, SearchSettings

CHEAP = "hidden_mse,psnr-32,psnr-64,fid-200"
CACHE = ROOT / "logs" / "benchmark" / "qdit-score-ranking"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quant", default="w4a8")
    p.add_argument("--random", type=int, default=4, help="random legal candidates besides the 4 uniform ones")
    p.add_argument("--full-samples", type=int, default=500)
    p.add_argument("--cheap", default=CHEAP, help="cheap scores: <score>[-<samples>], comma-separated")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/qdit-score-ranking"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = fresh_dir(Path(args.out))
    train_cfg = config("train", "method=qdit", f"quant={args.quant}", f"seed={args.seed}")
    eval_cfg = config("eval", f"ckpt={ROOT / 'data/dit_digits'}", f"num_samples={args.full_samples}",
                      f"seed={args.seed}", "paths.output_dir=/nonexistent")
    method = build_method(train_cfg)
    model = instantiate(train_cfg.model)
    linears = block_linears(model.blocks[0])
    method.check(linears)
    space = method.space_for(linears, len(model.blocks))
    sampler = instantiate(train_cfg.sampler)
    pool_cfg = train_cfg.pool
    pool = ZeroDataBlockInputs(model, sampler, pool_cfg.trajectories, pool_cfg.size, args.seed,
                               pool_cfg.heldout_trajectories, pool_cfg.heldout_size)
    scorer = instantiate(eval_cfg.metric)

    candidates = {f"uniform {g}": (g,) * space.genes for g in space.choices}
    draw = EvolutionSearch(SearchSettings(), space.choices, space.genes, space.legal,
                           candidates[f"uniform {space.base}"],
                           args.seed).random_genome
    rng = random.Random(args.seed)
    for i in range(args.random):
        candidates[f"random {i}"] = draw(rng)

    cheap = {}
    for key in args.cheap.split(","):
        kind, _, n = key.partition("-")
        cheap[key] = CandidateScore(kind, model, sampler, int(n or 1), args.seed, pool=pool, scorer=lambda: scorer)
    CACHE.mkdir(parents=True, exist_ok=True)
    keyed = lambda *parts: hashlib.sha1(json.dumps([args.quant, args.seed, args.full_samples, *parts]).encode()  # noqa
                                        ).hexdigest()[:12]
    fp_path = CACHE / f"fp-{keyed('fp')}.safetensors"
    if fp_path.exists():
        fp_images, fp_metrics = load_file(fp_path)["images"], json.loads(fp_path.with_suffix(".json").read_text())
    else:
        fp_images, _, fp_metrics = sample_and_score(eval_cfg, model)
        _store(fp_path.with_suffix(".json"), fp_metrics)
        save_file({"images": fp_images.contiguous()}, fp_path)
    rows = []
    for name, genome in candidates.items():
        path = CACHE / f"row-{keyed(list(genome), sorted(cheap))}.json"
        if path.exists():
            rows.append({**json.loads(path.read_text()), "candidate": name})
            continue
        start = time.time()
        cand = candidate_model(model, space.per_block(genome), method.quant.bits, method.quant.symmetric, space.base,
                               method.activation)
        row = {"candidate": name, "legal": space.legal(genome), "cost_vs_budget": space.cost(genome) / space.limit,
               "mean_group_size": sum(genome) / len(genome), "genome": list(genome)}
        row.update({key: score(cand) for key, score in cheap.items()})
        _, _, full = sample_and_score(eval_cfg, cand, compare_to=fp_images)
        row.update(full_fid=full["fid"], full_accuracy=full["class_accuracy"], full_psnr=full["psnr_vs_reference"],
                   seconds=round(time.time() - start, 1))
        _store(path, row)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "genome"}), flush=True)

    def rho(key: str, target: str, subset) -> float:
        sign = -1 if target == "full_psnr" else 1  # losses against a higher-is-better target
        return sign * spearmanr([r[key] for r in subset], [r[target] for r in subset]).statistic

    legal = [r for r in rows if r["legal"]]
    summary = {key: {"vs_full_fid": rho(key, "full_fid", rows), "vs_full_psnr": rho(key, "full_psnr", rows),
                     "vs_full_fid_legal": rho(key, "full_fid", legal) if len(legal) > 2 else None}
               for key in cheap}
    custom = (args.random, args.full_samples, args.quant, args.cheap) != (4, 500, "w4a8", CHEAP)
    setup = {"command": "python benchmarks/qdit_score_ranking.py" + (
                 f" --quant {args.quant} --random {args.random} --full-samples {args.full_samples} --cheap {args.cheap}"
                 if custom else ""),
             "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "threads": torch.get_num_threads(),
             "space": list(space.choices), "base": space.base, "budget": space.budget,
             "fp_full_fid": fp_metrics["fid"], "fid_floor": fp_metrics["fid_floor"], "summary": summary}
    fmt = lambda v: "–" if v is None else f"{v:+.2f}"  # noqa: E731
    lines = [f"Command: `{setup['command']}` ({setup['date']}, {setup['threads']} CPU thread). Reference digits DiT, "
             f"{args.quant} candidates (RTN weights + dynamic token-group activations at each candidate's group "
             f"sizes), space {list(space.choices)}, base {space.base}, budget {space.budget}. Full evaluation: "
             f"{args.full_samples} samples, eval noise (fp model: FID {fp_metrics['fid']:.2f}, floor "
             f"{fp_metrics['fid_floor']:.2f}). Cheap scores use the search's own noise stream. Losses: lower is "
             "better (psnr-N is minus the PSNR).", "",
             "| candidate | legal | cost / budget | mean group | " + " | ".join(cheap) +
             " | full FID | full PSNR (dB) | full class acc. | s |",
             "|---|---|---|---|" + "---|" * len(cheap) + "---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['candidate']} | {'yes' if r['legal'] else 'no'} | {r['cost_vs_budget']:.3f} | "
                     f"{r['mean_group_size']:.1f} | " + " | ".join(f"{r[k]:.4g}" for k in cheap) +
                     f" | {r['full_fid']:.2f} | {r['full_psnr']:.2f} | {r['full_accuracy']:.3f} | {r['seconds']:.0f} |")
    lines += ["", f"Spearman's rho of each cheap loss with the full evaluation ({len(rows)} candidates; legal ones "
              f"only: {len(legal)}):", "", "| cheap score | vs full FID | vs full PSNR | vs full FID, legal only |",
              "|---|---|---|---|"]
    lines += [f"| {k} | {fmt(v['vs_full_fid'])} | {fmt(v['vs_full_psnr'])} | {fmt(v['vs_full_fid_legal'])} |"
              for k, v in summary.items()]
    write_results(out, rows, "\n".join(lines), setup)
    print((out / "results.md").read_text())


def _store(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=float) + "\n")
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
