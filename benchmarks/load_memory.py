"""What a quantized checkpoint costs on disk and at load: file size against its fp32 model, and the peak memory
of loading it (project loader in both decode modes, and diffusers' from_pretrained of its export), each in a
fresh process. For the reference digits DiT's shape, one DiT-XL/2-shaped block and the whole DiT-XL/2 shape, all
at w2 (k=256, d=4) with random codes: file size and load cost do not depend on the values (a k-means w2
checkpoint of the shipped digits DiT has the same tensors: `--digits-ckpt` measures one).

Resident bytes: a loaded model's quantized layers (their parameters and buffers) against the checkpoint's tensors
of those layers, for the digits DiT's shape at every preset family (VQ w2 / w3 / w4; uniform, as RTN, GPTQ, Q-DiT
and PTQ4DiT deploy it, at 2, 3, 4 and 8 bits in groups of 64 or per channel, and in groups of 8, Q-DiT's smallest
on this model). And the full-precision loader (`load_dit` with weights): its peak against the model's tensors, for
the shipped digits DiT (a diffusers folder) and random original-layout `.pt` files of one XL block and of DiT-XL/2.

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

import torch
from harness import ROOT, fresh_dir, write_results
from omegaconf import OmegaConf

from vq4dit.deploy.export import export_diffusers
from vq4dit.deploy.memory import CPU_PROBE_ENV
from vq4dit.deploy.synthetic import DIT_XL_2, random_quantized_dit
from vq4dit.models.dit import build_transformer
from vq4dit.models.original_format import to_original
from vq4dit.quant.checkpoint import load_quantized, quantized_layers, read_manifest, save_quantized
from vq4dit.quant.presets import UniformPreset, VQPreset

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


FP_PROBE = """
import json, sys, torch
torch.set_num_threads(1)
from vq4dit.deploy.memory import peak_memory
from vq4dit.models import load_dit
load = lambda: load_dit("fp", json.loads(sys.argv[2]), weights=sys.argv[1])
load()
model, peak, held = peak_memory(load)
tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}.values()
print(json.dumps({"peak": peak, "held": held, "tensors": sum(t.numel() * t.element_size() for t in tensors)}))
"""


def probe(args: list[str], script: str = PROBE) -> dict:
    """`script` run on `args` in a fresh process: its last line, as JSON."""
    result = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True,
                            env={**os.environ, **CPU_PROBE_ENV}, timeout=1800)
    if result.returncode:
        raise SystemExit(f"probe failed: {result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


DIGITS = OmegaConf.to_container(OmegaConf.load(ROOT / "configs/model/dit_digits.yaml").arch)
RESIDENT_PRESETS = {
    "VQ w2 (k=256, d=4)": VQPreset(256, 4), "VQ w3 (k=64, d=2)": VQPreset(64, 2),
    "VQ w4 (k=256, d=2)": VQPreset(256, 2),
    **{f"uniform w{bits}g64": UniformPreset(bits, 64) for bits in (2, 3, 4)},
    "uniform w4g8 (Q-DiT's smallest group here)": UniformPreset(4, 8),
    **{f"uniform w{bits} per channel": UniformPreset(bits, None) for bits in (3, 4, 8)},
}


def resident_rows(work: Path) -> list[dict]:
    """Bytes the quantized layers of a loaded digits-shaped model hold against those the checkpoint stores."""
    rows = []
    for i, (name, preset) in enumerate(RESIDENT_PRESETS.items()):
        folder = save_quantized(random_quantized_dit(DIGITS, preset, name="dit_digits"), work / f"resident-{i}")
        layers = quantized_layers(load_quantized(folder)).values()
        tensors = {id(t): t for layer in layers for t in [*layer.parameters(), *layer.buffers()]}.values()
        sizes = read_manifest(folder)["sizes"]
        rows.append({"preset": name, "stored_bytes": sizes["blocks_bytes"],
                     "resident_bytes": sum(t.numel() * t.element_size() for t in tensors),
                     "blocks_bits_per_weight": sizes["blocks_bits_per_weight"]})
    return rows


def fp_rows(work: Path) -> list[dict]:
    """The full-precision loader's peak: the shipped digits DiT, and original-layout files of XL shapes."""
    files = {"digits DiT (data/dit_digits, diffusers folder)": (ROOT / "data/dit_digits", DIGITS)}
    for name, arch in (("one DiT-XL/2-shaped block (original .pt)", {**DIT_XL_2, "num_layers": 1}),
                       ("DiT-XL/2 shape (original .pt)", DIT_XL_2)):
        state = to_original(build_transformer(dict(arch)).state_dict(), arch["num_layers"])
        torch.save(state, work / f"fp-{len(files)}.pt")
        files[name] = (work / f"fp-{len(files)}.pt", arch)
        del state
    rows = []
    for name, (path, arch) in files.items():
        rows.append({"model": name, **probe([str(path), json.dumps(arch)], FP_PROBE)})
        print(name, json.dumps(rows[-1]), flush=True)
    return rows


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
                row[how] = probe([how, str(path)])
                row[how]["process_s"] = round(time.perf_counter() - start, 1)
            rows.append(row)
            print(name, json.dumps(row), flush=True)
        resident = resident_rows(work)
        full_precision = fp_rows(work)
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
    lines += ["", "Quantized layers of the digits DiT's shape, loaded (`decode=per_forward`): the bytes they hold in "
              "memory against the checkpoint's tensors of those layers (codes, codebooks / scales / zero points, "
              "biases).", "",
              "| preset | checkpoint bits / weight | checkpoint KiB | resident KiB | resident / checkpoint |",
              "|" + "---|" * 5]
    lines += [f"| {r['preset']} | {r['blocks_bits_per_weight']:.3f} | {r['stored_bytes'] / 1024:.1f} | "
              f"{r['resident_bytes'] / 1024:.1f} | **{r['resident_bytes'] / r['stored_bytes']:.3f}** |"
              for r in resident]
    lines += ["", "The full-precision loader (`load_dit` with weights): the model is built without weights and takes "
              "the file's tensors as its own.", "",
              "| model | model tensors MiB | load peak MiB | peak / model |", "|" + "---|" * 4]
    lines += [f"| {r['model']} | {m(r['tensors'])} | {m(r['peak'])} | **{r['peak'] / r['tensors']:.2f}** |"
              for r in full_precision]
    header = f"Command: `python benchmarks/load_memory.py` ({when}); CPU, resident-set peaks in fresh processes."
    write_results(out, rows, header + "\n\n" + "\n".join(lines),
                  {"when": when, "resident": resident, "full_precision": full_precision})
    print("\n".join(lines))


if __name__ == "__main__":
    main()
