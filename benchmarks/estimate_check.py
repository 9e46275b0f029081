"""The dry run's estimate against the run it estimates, phase by phase: `python train.py <overrides> dry_run=true`
for this machine, then the same command for real, in one process at the run's CPU threads (`threads: 1`, the
default); the measurement is the run's own phases.json. The issue's criterion: the total within 2x.

    python benchmarks/estimate_check.py                     # quant=w3 (the digits default) -> results/estimate-check/
    python benchmarks/estimate_check.py --overrides "model=dit_tiny quant.k=16 quant.d=2" --out /tmp/estimate-check

The run's folder (checkpoint, block cache, TensorBoard) goes to a temporary folder; results.md and results.json
hold the command, the machine's load average before and after (the machine may be shared) and the figures.
"""

import argparse
import json
import os
import subprocess
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from harness import ROOT, config, fresh_dir, write_results

from vq4dit.cli.estimate import estimate
from vq4dit.cli.quantize import quantize


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--overrides", default="quant=w3", help="train.py's overrides, space-separated")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/estimate-check"))
    args = p.parse_args()
    out = fresh_dir(Path(args.out))
    overrides = args.overrides.split()
    loads = {"before": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        paths = [f"paths.output_dir={tmp}/run", f"paths.log_dir={tmp}/logs"]
        start = time.perf_counter()
        predicted = estimate(config("train", *overrides, *paths, "dry_run=true"))
        dry_run_seconds = time.perf_counter() - start
        loads["between"] = os.getloadavg()
        start = time.perf_counter()
        quantize(config("train", *overrides, *paths))
        run_seconds = time.perf_counter() - start
        measured = json.loads(Path(tmp, "run", "phases.json").read_text())
    loads["after"] = os.getloadavg()

    names = list(predicted.phases) + [name for name in measured if name not in predicted.phases]
    rows = [{"phase": name, "estimated_s": predicted.phases.get(name), "measured_s": measured.get(name)}
            for name in names]
    total = {"phase": "total", "estimated_s": predicted.total_seconds, "measured_s": sum(measured.values())}
    for row in [*rows, total]:
        e, m = row["estimated_s"], row["measured_s"]
        row["ratio"] = e / m if e is not None and m else None
    command = "python benchmarks/estimate_check.py" + ("" if args.overrides == "quant=w3"
                                                       else f" --overrides {args.overrides!r}")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True)
    setup = {"command": command, "estimated_command": f"python train.py {args.overrides} dry_run=true",
             "measured_command": f"python train.py {args.overrides}",
             "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
             "commit": commit.stdout.strip() + (" with uncommitted changes" if dirty.stdout.strip() else ""),
             "load_average_1_5_15_min": loads, "cpus": os.cpu_count(), "dry_run_seconds": dry_run_seconds,
             "run_seconds": run_seconds, "per_block_estimated_s": predicted.block, "estimate": str(predicted)}
    fmt = lambda v: "–" if v is None else f"{v:.1f}"  # noqa: E731
    ratio = lambda v: "–" if v is None else f"{v:.2f}"  # noqa: E731
    busy = max(max(load) for load in loads.values())
    lines = [f"Command: `{command}` ({setup['date']}, commit {setup['commit']}). The dry run "
             f"(`{setup['estimated_command']}`, {dry_run_seconds:.0f} s) and then the run itself "
             f"(`{setup['measured_command']}`, {run_seconds:.0f} s) in one process, one CPU thread each "
             "(`threads: 1`); measured: the run's phases.json. "
             + (f"Measured under load: the machine ({os.cpu_count()} CPUs) was shared, load average up to "
                f"{busy:.1f} (1/5/15 min before, between, after: "
                + "; ".join(f"{k} {' / '.join(f'{v:.1f}' for v in load)}" for k, load in loads.items())
                + "); both sides of each ratio saw it, not always equally." if busy > 1.5 else
                f"Load average at most {busy:.1f} on {os.cpu_count()} CPUs."), "",
             "| phase | estimated s | measured s | estimated / measured |", "|---|---|---|---|"]
    lines += [f"| {r['phase']} | {fmt(r['estimated_s'])} | {fmt(r['measured_s'])} | {ratio(r['ratio'])} |"
              for r in [*rows, total]]
    lines += ["", "Per block, estimated: " + ", ".join(f"{k} {v:.1f} s" for k, v in predicted.block.items()) + ".",
              "", "The dry run's output:", "", "```", str(predicted), "```"]
    write_results(out, [*rows, total], "\n".join(lines), setup)
    print((out / "results.md").read_text())


if __name__ == "__main__":
    main()
