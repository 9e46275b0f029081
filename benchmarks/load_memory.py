"""What a quantized checkpoint costs on disk and at load: file size against its fp32 model, and the peak memory
of loading it (project loader in both decode modes, and diffusers' from_pretrained of its export), each in a
fresh process. For the reference digits DiT's shape, one DiT-XL/2-shaped block and the whole DiT-XL/2 shape, all
at w2 (k=256, d=4) with random codes: file size and load cost do not depend on the values (a k-means w2
checkpoint of the shipped digits DiT has the same tensors: `--digits-ckpt` measures one).

    python benchmarks/load_memory.py                     # -> benchmarks/results/load/

Peak: the process's resident-set high-water mark (Linux /proc/self/status VmHWM, reset just before the load;
glibc told to map large blocks so freed memory leaves), above the resident set just before. The project loader
reads the file with plain reads, a tensor at a time; diffusers maps the file, so its peak also counts the file
pages it touched. A second load is measured: the first pays for imports and one-time allocations.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from harness import ROOT, fresh_dir, write_results

from vq4dit.deploy.export import export_diffusers
from vq4dit.deploy.memory import CPU_PROBE_ENV
from vq4dit.deploy.synthetic import DIT_XL_2, random_quantized_dit
from vq4dit.quant.checkpoint import load_quantized, read_manifest, save_quantized
from vq4dit.quant.presets import VQPreset

PROBE = """
import json, sys, torch
torch.set_num_threads(1)
import vq4dit
from diffusers import DiTTransformer2DModel
from vq4dit.deploy.memory import peak_memory
from vq4dit.quant.checkpoint import load_quantized
how, path = sys.argv[1], sys.argv[2]
load = {"per_forward": lambda: load_quantized(path), "once": lambda: load_quantized(path, decode="once"),
        "diffusers": lambda: DiTTransformer2DModel.from_pretrained(path)}[how]
load()
model, peak, held = peak_memory(load)
tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}.values()
print(json.dumps({"peak": peak, "held": held, "tensors": sum(t.numel() * t.element_size() for t in tensors)}))
"""


def probe(how: str, path: Path) -> dict:
    result = subprocess.run([sys.executable, "-c", PROBE, how, str(path)], capture_output=True, text=True,
                            env={**os.environ, **CPU_PROBE_ENV}, timeout=900)
    if result.returncode:
        raise SystemExit(f"probe failed: {result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


DIGITS = dict(num_attention_heads=4, attention_head_dim=64, in_channels=1, out_channels=1, num_layers=6,
              sample_size=16, patch_size=4, num_embeds_ada_norm=10, norm_eps=1e-6)  # configs/model/dit_digits.yaml


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/load"))
    p.add_argument("--digits-ckpt", help="a quantized checkpoint of the digits DiT to measure as well")
    args = p.parse_args()
    out = fresh_dir(Path(args.out))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        models = {} if args.digits_ckpt is None else {f"digits DiT, {args.digits_ckpt}": Path(args.digits_ckpt)}
        for name, arch in (("digits DiT shape, w2", DIGITS),
                           ("one DiT-XL/2-shaped block, w2", {**DIT_XL_2, "num_layers": 1}),
                           ("DiT-XL/2 shape (28 blocks), w2", DIT_XL_2)):
            models[name] = save_quantized(random_quantized_dit(arch, VQPreset(256, 4), name=name.split(",")[0]),
                                          work / f"ckpt-{len(models)}")
        for name, ckpt in models.items():
            sizes = read_manifest(ckpt)["sizes"]
            exported = export_diffusers(load_quantized(ckpt), work / f"export-{len(rows)}")
            row = {"model": name, "file_bytes": os.path.getsize(ckpt / "model.safetensors"), **sizes}
            for how, path in (("per_forward", ckpt), ("once", ckpt), ("diffusers", exported)):
                start = time.perf_counter()
                row[how] = probe(how, path)
                row[how]["process_s"] = round(time.perf_counter() - start, 1)
            rows.append(row)
            print(name, json.dumps(row), flush=True)
    when = datetime.now(timezone.utc).isoformat(timespec="seconds")
    lines = ["| model | params | fp32 MiB | file MiB | × smaller | bits / weight, model (quantized linears) | "
             "load peak MiB, per_forward (model tensors after) | load peak MiB, decode=once fp32 | "
             "load peak MiB, diffusers from_pretrained |", "|" + "---|" * 9]
    m = lambda b: f"{b / 2**20:.1f}"  # noqa: E731
    for r in rows:
        lines.append(f"| {r['model']} | {r['model_params'] / 1e6:.1f} M | {m(r['model_fp32_bytes'])} | "
                     f"{m(r['file_bytes'])} | {r['model_fp32_bytes'] / r['file_bytes']:.1f}× | "
                     f"{r['model_bits_per_weight']:.2f} ({r['blocks_bits_per_weight']:.3f}) | "
                     f"{m(r['per_forward']['peak'])} ({m(r['per_forward']['tensors'])}) | {m(r['once']['peak'])} | "
                     f"{m(r['diffusers']['peak'])} |")
    header = f"Command: `python benchmarks/load_memory.py` ({when}); CPU, resident-set peaks in fresh processes."
    write_results(out, rows, header + "\n\n" + "\n".join(lines), {"when": when})
    print("\n".join(lines))


if __name__ == "__main__":
    main()
