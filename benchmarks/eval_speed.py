"""How fast `eval.py` samples and scores, and what the cache of the real images' features saves.

    python benchmarks/eval_speed.py --ckpt logs/train/runs/<timestamp>/checkpoint   # -> benchmarks/results/eval-speed/

At one CPU thread (OMP_NUM_THREADS=1), two whole `eval.py ckpt=<ckpt>` processes into one fresh log folder: the
cache cold (the real images' features computed in the run, as every run computed them before the cache, and
stored) and warm (loaded). For each: the process's wall and CPU seconds (measured here, start-up included) and
eval's own `speed.json` (samples per second of sampling and of scoring, seconds per phase).
Then, in this one process at one thread, the real images' features computed and loaded from the cache in turn,
`--repeats` times each: min / median / max and the ratio of the medians. `--before DIR` also times the eval.py of
an earlier copy of the project (`git archive <commit> | tar -x -C DIR`): wall and CPU only (no speed.json there).
The load average of the machine is recorded beside each run: on a shared machine the wall times are noisy.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from harness import ROOT, config, fresh_dir, write_results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="the checkpoint to score (a quantized folder or fp weights)")
    p.add_argument("--num-samples", type=int, default=500)
    p.add_argument("--repeats", type=int, default=5, help="in-process timings of the real images' features")
    p.add_argument("--before", default=None, help="an earlier copy of the project whose eval.py is timed too")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/eval-speed"))
    args = p.parse_args()
    out = fresh_dir(Path(args.out))
    ckpt = Path(args.ckpt).resolve()

    runs = []
    with tempfile.TemporaryDirectory(prefix="eval-speed-") as tmp:
        logs = Path(tmp) / "logs"
        if args.before:
            runs.append(eval_run("before (earlier copy)", Path(args.before).resolve(), ckpt, logs / "before",
                                 Path(tmp) / "before", args.num_samples))
        for name in ("cache cold", "cache warm"):
            runs.append(eval_run(name, ROOT, ckpt, logs, Path(tmp) / name.replace(" ", "-"), args.num_samples))
        features = reference_timings(ckpt, Path(tmp) / "in-process-cache", args.repeats)

    command = f"python benchmarks/eval_speed.py --ckpt {args.ckpt}" + (
        "" if args.num_samples == 500 else f" --num-samples {args.num_samples}") + (
        "" if args.repeats == 5 else f" --repeats {args.repeats}") + (
        f" --before {args.before}" if args.before else "") + (
        "" if Path(args.out).resolve() == ROOT / "benchmarks/results/eval-speed" else f" --out {args.out}")
    setup = {"command": command, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
             "num_samples": args.num_samples, "threads": 1, "cpus": os.cpu_count(), "reference_features": features}
    write_results(out, runs, table(runs, features, setup), setup)
    print((out / "results.md").read_text())


def eval_run(name: str, root: Path, ckpt: Path, log_dir: Path, run_dir: Path, num_samples: int) -> dict:
    """One `eval.py` process of the project copy at `root`, at one thread."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PROJECT_ROOT": str(root),
           "PYTHONPATH": str(root / "src")}
    command = [sys.executable, str(root / "eval.py"), f"ckpt={ckpt}", f"num_samples={num_samples}",
               f"paths.log_dir={log_dir}", f"hydra.run.dir={run_dir}"]
    load, cpu = os.getloadavg()[0], _children_cpu()
    start = time.perf_counter()
    result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - start, _children_cpu() - cpu
    if result.returncode != 0:
        raise SystemExit(f"error: {name}: eval.py exited {result.returncode}: {result.stderr[-2000:]}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    speed_file = run_dir / "speed.json"
    speed = json.loads(speed_file.read_text()) if speed_file.exists() else None
    print(f"{name}: {wall:.1f} s", flush=True)
    return {"run": name, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "load_before": round(load, 2),
            "load_after": round(os.getloadavg()[0], 2), "fid": metrics["fid"],
            "class_accuracy": metrics.get("class_accuracy"), "speed": speed}


def _children_cpu() -> float:
    """User + system CPU seconds of the finished child processes: less moved by other work than wall time."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def reference_timings(ckpt: Path, folder: Path, repeats: int) -> dict:
    """Seconds to get the digits protocol's real features: computed (no cache) and loaded (warm cache), in turn."""
    import torch

    from vq4dit.errors import instantiate
    from vq4dit.reference_cache import ReferenceCache

    torch.set_num_threads(1)
    metric = config("eval", f"ckpt={ckpt}").metric
    instantiate(metric, cache=ReferenceCache(folder)).real_features()  # fills the cache
    seconds = {"computed": [], "loaded": []}
    for _ in range(repeats):
        for how, cache in (("computed", ReferenceCache(None)), ("loaded", ReferenceCache(folder))):
            scorer = instantiate(metric, cache=cache)
            scorer.real_features()
            seconds[how].append(cache.report[0]["seconds"])
    spread = {how: {"min": min(s), "median": statistics.median(s), "max": max(s)} for how, s in seconds.items()}
    return {**spread, "ratio_of_medians": spread["computed"]["median"] / spread["loaded"]["median"],
            "repeats": repeats}


def table(runs: list[dict], features: dict, setup: dict) -> str:
    lines = [f"Command: `{setup['command']}` ({setup['date']}, {setup['cpus']} CPUs, 1 torch thread, "
             f"{setup['num_samples']} samples). Each row is one `eval.py` process; wall and CPU (user + system): the "
             "whole process, start-up included; sampling and scoring: eval's own `speed.json`, wall seconds "
             "(scoring includes the real images' features). The machine is shared with other work: the load "
             "average (1 min) before and after each run is given; the wall times carry that noise, the CPU "
             "seconds less of it.", "",
             "| run | wall s | CPU s | sampling samples/s (s) | scoring samples/s (s) | real features | load | FID |",
             "|---|---|---|---|---|---|---|---|"]
    for run in runs:
        speed = run["speed"]
        if speed is None:
            sampling = scoring = real = "not reported"
        else:
            rates, seconds = speed["samples_per_s"], speed["seconds"]
            sampling = f"{rates['sampling']:.2f} ({seconds['sampling']:.1f})"
            scoring = f"{rates['scoring']:.0f} ({seconds['scoring']:.2f})"
            real = "; ".join(f"{r['source'].split(' ')[0].rstrip(',')} in {r['seconds']:.2f} s"
                             for r in speed["reference_features"])
        lines.append(f"| {run['run']} | {run['wall_s']} | {run['cpu_s']} | {sampling} | {scoring} | {real} | "
                     f"{run['load_before']} -> {run['load_after']} | {run['fid']:.3f} |")
    c, lo = features["computed"], features["loaded"]
    lines += ["", f"The digits protocol's real features (1797 real digits through the classifier) in one process, "
              f"{features['repeats']} times each, min / median / max: computed {c['min']:.3f} / {c['median']:.3f} / "
              f"{c['max']:.3f} s, loaded from the cache {lo['min']:.3f} / {lo['median']:.3f} / {lo['max']:.3f} s "
              f"(key included): {features['ratio_of_medians']:.1f}x."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
