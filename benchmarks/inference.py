"""Inference cost of quantized DiTs in both modes against the dense layers: latency and peak memory of every
DiT-XL/2 linear shape and a whole XL-shaped block at 2 bits (k=256, d=4) at 256 tokens a sample, and of the whole
digits DiT (16 tokens a sample) with VQ4DiT's default w3 layers (k=64, d=2: 6-bit codes) and with w3g64 uniform
layers (RTN, GPTQ, Q-DiT, PTQ4DiT deploy these). `per_forward` keeps the codes bit-packed and decodes tile by tile
in each forward; `once` decodes to dense at load (its forward is the dense one, so the table gives its decode time).
Codes are random: speed and memory do not depend on values.

    python benchmarks/inference.py                                   # CPU, 1 thread -> benchmarks/results/inference/
    python benchmarks/inference.py --device cuda --dtypes float16,bfloat16 --out results-h100

Latency: both modes timed in turn (dense, per_forward, dense, ...) after warm-up, --reps times; each repeat's
per_forward / dense ratio comes from the two forwards next to each other, and the table gives their min, median
and max (on a shared machine the pairs see the same load), with each mode's min and median time.
Memory: each (case, mode, batch) in a fresh process: the peak above the state just before the forward (weights
and input allocated): CUDA's max_memory_allocated, or on a CPU the resident-set high-water mark (Linux
/proc/self/status VmHWM, reset before the forward; glibc told to map large blocks, so freed memory leaves),
which also counts the output. per_forward's weight memory = its resident codes, codebooks and biases + what its
forward peaks above the dense forward's (the decode tile and its index: output and activations are the same).

Launches (`--counts-only` runs just these, in seconds): the tiles (one decode + one GEMM each) and the kernels a
forward launches, counted as the aten ops it dispatches that compute (views and bare allocations launch nothing;
on a GPU each is about one kernel launch), in the quantized linears (decode, GEMM and their casts) and in all, for
every case and for a whole DiT-XL/2 forward (28 blocks). Model cast to the dtype: counted on the meta device at
256 tokens; fp32 weights under bf16 autocast (`sampler.precision=bf16`): on the CPU at 4 tokens (counts do not
depend on tokens). Dense: the `decode=once` model.
"""

import argparse
import contextlib
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from harness import ROOT, fresh_dir, write_results
from omegaconf import OmegaConf
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from vq4dit.deploy.memory import CPU_PROBE_ENV, peak_memory
from vq4dit.deploy.synthetic import DIT_XL_2, random_layer, random_quantized_dit
from vq4dit.quant import decode
from vq4dit.quant.block_layers import QUANTIZED_LINEARS
from vq4dit.quant.presets import UniformPreset, VQPreset
from vq4dit.quant.quantized_linear import QuantizedLinear, decode_once

PRESET = VQPreset(k=256, d=4)  # w2, for DiT-XL/2's shapes
HIDDEN, TOKENS = 1152, 256
DIGITS = OmegaConf.to_container(OmegaConf.load(ROOT / "configs/model/dit_digits.yaml").arch)
CASES = {  # name -> (out, in) of a linear, "block" or "digits", and the preset; adaLN sees one row per sample
    "attn q / k / v / out (1152→1152)": ((1152, 1152), PRESET), "mlp fc1 (1152→4608)": ((4608, 1152), PRESET),
    "mlp fc2 (4608→1152)": ((1152, 4608), PRESET),
    "adaLN modulation (1152→6912), per sample": ((6912, 1152), PRESET),
    "whole block (7 linears + attention)": ("block", PRESET),
    "digits DiT forward, w3 VQ (k=64, d=2)": ("digits", VQPreset(k=64, d=2)),
    "digits DiT forward, w3g64 uniform": ("digits", UniformPreset(bits=3, group_size=64)),
}


def build(case: str, mode: str, dtype: torch.dtype, device: torch.device):
    """(module, forward(batch) -> output factory) for `case` in `mode` ("dense" or "per_forward")."""
    g = torch.Generator().manual_seed(0)
    what, preset = CASES[case]
    if what == "block":
        module = random_quantized_dit({**DIT_XL_2, "num_layers": 1}, preset).transformer.transformer_blocks[0]
    elif what == "digits":
        module = random_quantized_dit(DIGITS, preset, name="dit_digits").transformer
    else:
        module = random_layer(*what, preset, g)
    if mode == "dense":
        module = module.to_dense(dtype) if isinstance(what, tuple) else decode_once(module, dtype)
    module = module.to(device=device, dtype=dtype).eval().requires_grad_(False)

    def inputs(batch: int):
        if what == "block":
            return dict(hidden_states=torch.randn(batch, TOKENS, HIDDEN, generator=g).to(device, dtype),
                        timestep=torch.randint(0, 1000, (batch,), generator=g).to(device),
                        class_labels=torch.randint(0, 1000, (batch,), generator=g).to(device))
        if what == "digits":
            size, classes = DIGITS["sample_size"], DIGITS["num_embeds_ada_norm"]
            x = torch.randn(batch, DIGITS["in_channels"], size, size, generator=g)
            return dict(hidden_states=x.to(device, dtype), return_dict=False,
                        timestep=torch.randint(0, 1000, (batch,), generator=g).to(device),
                        class_labels=torch.randint(0, classes, (batch,), generator=g).to(device))
        rows = batch if case.startswith("adaLN") else batch * TOKENS
        return dict(x=torch.randn(rows, what[1], generator=g).to(device, dtype))

    return module, inputs


def weight_bytes(module) -> int:
    """Bytes of the weights a forward reads: parameters and buffers, a block's embedder included."""
    tensors = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def run(module, kwargs) -> torch.Tensor:
    with torch.no_grad():
        out = module(kwargs["x"]) if "x" in kwargs else module(**kwargs)  # nn.Linear names it `input`
    return out[0] if isinstance(out, tuple) else out  # a whole DiT's (sample,)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def latency(case: str, dtype: torch.dtype, batch: int, device: torch.device, reps: int) -> dict:
    modules = {mode: build(case, mode, dtype, device) for mode in ("dense", "per_forward")}
    kwargs = modules["dense"][1](batch)
    times = {mode: [] for mode in modules}
    for rep in range(reps + 2):  # two warm-up rounds
        for mode, (module, _) in modules.items():
            sync(device)
            start = time.perf_counter()
            run(module, kwargs)
            sync(device)
            if rep >= 2:
                times[mode].append(1e3 * (time.perf_counter() - start))
    torch.testing.assert_close(run(modules["per_forward"][0], kwargs).float(), run(modules["dense"][0], kwargs).float(),
                               rtol=0.05, atol=0.05)  # the same layer in both modes
    out = {f"{mode}_ms_{stat}": round(f(ts), 3) for mode, ts in times.items()
           for stat, f in (("min", min), ("median", statistics.median))}
    ratios = [q / d for d, q in zip(times["dense"], times["per_forward"])]  # each repeat's pair, side by side
    out.update({f"ratio_{stat}": round(f(ratios), 3) for stat, f in (("min", min), ("median", statistics.median),
                                                                     ("max", max))})
    start = time.perf_counter()
    decode_once(copy.deepcopy(modules["per_forward"][0]), dtype) if not isinstance(CASES[case][0], tuple) \
        else modules["per_forward"][0].to_dense(dtype)
    sync(device)
    out["once_decode_ms"] = round(1e3 * (time.perf_counter() - start), 3)
    out.update({f"{mode}_weights_bytes": weight_bytes(m) for mode, (m, _) in modules.items()})
    return out


NO_KERNEL = {"aten.empty", "aten.empty_strided", "aten._unsafe_view", "aten.lift_fresh"}  # allocation / views


class KernelCount(TorchDispatchMode):
    """Counts the computing aten ops of what runs inside it: `all`, and `linears`, those inside the forwards of the
    modules `linears` (hooks mark them)."""

    def __init__(self, linears: list[nn.Module]):
        super().__init__()
        self.all = self.linears = 0
        self.inside = False
        self.hooks = [h for m in linears for h in (m.register_forward_pre_hook(lambda *_: self._mark(True)),
                                                   m.register_forward_hook(lambda *_: self._mark(False)))]

    def _mark(self, inside: bool) -> None:
        self.inside = inside

    def __exit__(self, *exc):
        for hook in self.hooks:
            hook.remove()
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and str(func.overloadpacket) not in NO_KERNEL:
            self.all += 1
            self.linears += self.inside
        return func(*args, **(kwargs or {}))


def quantized_sites(module: nn.Module) -> list[nn.Module]:
    """The module's quantized linears, or their dense replacements: the module itself if it is one layer."""
    if isinstance(module, (QuantizedLinear, nn.Linear)):
        return [module]
    return [m for name, m in module.named_modules()
            if any(name == q or name.endswith("." + q) for q in QUANTIZED_LINEARS)]


def launches(module: nn.Module, kwargs: dict, autocast: torch.dtype | None = None) -> dict:
    """Tiles and kernel launches (in the quantized linears, in all) of one forward of `module`."""
    device_type = next(iter(kwargs.values())).device.type
    precision = contextlib.nullcontext() if autocast is None else torch.autocast(device_type, dtype=autocast)
    with decode.TileCounter() as tiles, KernelCount(quantized_sites(module)) as kernels, precision:
        run(module, kwargs)
    return {"tiles": tiles.tiles, "linear_kernels": kernels.linears, "all_kernels": kernels.all}


def case_launches(case: str, dtype: torch.dtype) -> dict:
    """A case's launches per forward in both modes (meta device: nothing computed)."""
    out = {}
    for mode in ("dense", "per_forward"):
        module, inputs = build(case, mode, dtype, torch.device("meta"))
        counts = launches(module, inputs(2))
        out.update({f"{mode}_{key}": value for key, value in counts.items()})
    return out


def xl_launches(dtype: torch.dtype, autocast: bool) -> dict:
    """Launches of one whole DiT-XL/2 forward in both modes: the model cast to `dtype` on the meta device (256
    tokens), or fp32 weights under `dtype` autocast on the CPU (4 tokens: the same kernels, little compute)."""
    arch, device = ({**DIT_XL_2, "sample_size": 4}, "cpu") if autocast else (DIT_XL_2, "meta")
    size = arch["sample_size"]
    kwargs = dict(hidden_states=torch.randn(1, 4, size, size, device=device),
                  timestep=torch.zeros(1, dtype=torch.long, device=device),
                  class_labels=torch.zeros(1, dtype=torch.long, device=device))
    name = str(dtype).removeprefix("torch.")
    out = {"dtype": f"fp32 weights, {name} autocast" if autocast else name,
           "tokens": (size // arch["patch_size"]) ** 2}
    for mode in ("per_forward", "dense"):
        model = random_quantized_dit(arch, PRESET).transformer.to(device)
        if not autocast:
            model = model.to(dtype)
            kwargs["hidden_states"] = kwargs["hidden_states"].to(dtype)
        if mode == "dense":
            model = decode_once(model)
        counts = launches(model, kwargs, dtype if autocast else None)
        out.update({f"{mode}_{key}": value for key, value in counts.items()})
        del model
    return out


def xl_table(rows: list[dict]) -> str:
    lines = ["| whole DiT-XL/2 forward (28 blocks) | tokens | tiles | decode + GEMM kernels in the quantized linears, "
             "per_forward / dense | kernels in all, per_forward / dense |", "|" + "---|" * 5]
    for r in rows:
        lines.append(f"| {r['dtype']} | {r['tokens']} | {r['per_forward_tiles']} | {r['per_forward_linear_kernels']} / "
                     f"{r['dense_linear_kernels']} | {r['per_forward_all_kernels']} / {r['dense_all_kernels']} |")
    return "\n".join(lines)


def probe(case: str, mode: str, dtype: torch.dtype, batch: int, device: torch.device) -> dict:
    """Peak memory of one forward in this (fresh) process."""
    module, inputs = build(case, mode, dtype, device)
    kwargs = inputs(batch)
    out, peak, _ = peak_memory(lambda: run(module, kwargs), device)
    return {"peak_bytes": peak, "output_bytes": out.numel() * out.element_size()}


def memory(case: str, mode: str, dtype: str, batch: int, device: str, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--probe", json.dumps([case, mode, dtype, batch]), "--device", device,
           "--threads", str(threads)]
    env = {**os.environ, **(CPU_PROBE_ENV if device == "cpu" else {})}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if result.returncode:
        raise SystemExit(f"memory probe failed: {result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def table(rows: list[dict]) -> str:
    head = ("| case | dtype | batch | dense ms (min / median) | per_forward ms (min / median) | per_forward / dense, "
            "per repeat (min / **median** / max) | decode=once ms | dense weights MiB | per_forward weight memory MiB "
            "(resident + decoding) "
            "| / dense | forward peak MiB, dense / per_forward (measured) | per_forward tiles | decode + GEMM kernels, "
            "per_forward / dense |")
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['dtype']} | {r['batch']} | {r['dense_ms_min']:.1f} / {r['dense_ms_median']:.1f} | "
            f"{r['per_forward_ms_min']:.1f} / {r['per_forward_ms_median']:.1f} | "
            f"{r['ratio_min']:.2f} / **{r['ratio_median']:.2f}×** / {r['ratio_max']:.2f} | {r['once_decode_ms']:.1f} | "
            f"{mib(r['dense_weights_bytes'])} | {mib(r['per_forward_weight_memory_bytes'])} | "
            f"**{r['per_forward_weight_memory_bytes'] / r['dense_weights_bytes']:.2f}×** | "
            f"{mib(r['dense_peak_bytes'])} / {mib(r['per_forward_peak_bytes'])} | {r['per_forward_tiles']} | "
            f"{r['per_forward_linear_kernels']} / {r['dense_linear_kernels']} |")
    return "\n".join(lines)


def counts_table(rows: list[dict]) -> str:
    lines = ["| case | dtype | per_forward tiles | decode + GEMM kernels, per_forward / dense |", "|" + "---|" * 4]
    lines += [f"| {r['case']} | {r['dtype']} | {r['per_forward_tiles']} | {r['per_forward_linear_kernels']} / "
              f"{r['dense_linear_kernels']} |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtypes", default="bfloat16,float32")
    p.add_argument("--batches", default="1,2,8")
    p.add_argument("--cases", default=",".join(str(i) for i in range(len(CASES))), help="indices into CASES")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 unless measuring threads)")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/inference"))
    p.add_argument("--counts-only", action="store_true", help="only the tile and kernel-launch counts (seconds)")
    p.add_argument("--probe", help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.probe:
        case, mode, dtype, batch = json.loads(args.probe)
        print(json.dumps(probe(case, mode, getattr(torch, dtype), batch, device)))
        return
    out = fresh_dir(Path(args.out))
    names = [list(CASES)[int(i)] for i in args.cases.split(",")]
    dtypes = args.dtypes.split(",")
    counts = {(case, dtype): case_launches(case, getattr(torch, dtype)) for dtype in dtypes for case in names}
    xl = [xl_launches(getattr(torch, dtype), autocast=False) for dtype in dtypes]
    xl += [xl_launches(getattr(torch, dtype), autocast=True) for dtype in dtypes if dtype in ("bfloat16", "float16")]
    print(xl_table(xl), flush=True)
    rows = []
    for dtype in dtypes:
        for case in names:
            if args.counts_only:
                rows.append({"case": case, "dtype": dtype, **counts[case, dtype]})
                continue
            for batch in map(int, args.batches.split(",")):
                row = {"case": case, "dtype": dtype, "batch": batch, **counts[case, dtype],
                       **latency(case, getattr(torch, dtype), batch, device, args.reps)}
                for mode in ("dense", "per_forward"):
                    m = memory(case, mode, dtype, batch, args.device, args.threads)
                    row[f"{mode}_peak_bytes"], row["output_bytes"] = m["peak_bytes"], m["output_bytes"]
                decoding = max(0, row["per_forward_peak_bytes"] - row["dense_peak_bytes"])
                row["per_forward_weight_memory_bytes"] = row["per_forward_weights_bytes"] + decoding
                rows.append(row)
                print(table([row]).splitlines()[-1], flush=True)
    command = "python benchmarks/inference.py " + " ".join(sys.argv[1:])
    when = datetime.now(timezone.utc).isoformat(timespec="seconds")
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda"
               else f"{platform.processor() or platform.machine()} CPU, {args.threads} thread(s)")
    header = (f"Command: `{command.strip()}` ({when}), torch {torch.__version__}, {machine}. "
              f"DiT-XL/2 shapes at 2 bits (k=256, d=4), {TOKENS} tokens a sample; the digits DiT at w3 (k=64, d=2) "
              f"or w3g64, 16 tokens a sample; decode tile {decode.TILE_WEIGHTS} weights.")
    tables = (counts_table if args.counts_only else table)(rows) + "\n\n" + xl_table(xl)
    write_results(out, rows, header + "\n\n" + tables,
                  {"command": command, "when": when, "machine": machine, "xl_forward": xl})
    print(header)


if __name__ == "__main__":
    main()
