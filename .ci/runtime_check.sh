#!/usr/bin/env bash
# The runtime alone, installed as a user installs it: a fresh venv gets torch (pinned: the CPU wheel, as the
# Makefile pins it) and `pip install .` without extras, then loads a tiny quantized checkpoint (load_quantized), its
# exported diffusers folder (from_pretrained) and a pipeline folder (ConditionalDiTPipeline), and checks that they
# compute exactly what the development venv (.venv, which wrote them) computes, with none of the training stack
# installed. Run from anywhere: .ci/runtime_check.sh   (MAIN_PY=<python> to write them with another interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
MAIN_PY=${MAIN_PY:-$ROOT/.venv/bin/python}
TORCH=torch==2.13.0
start=$SECONDS
step() { echo "[$((SECONDS - start)) s] $*"; }
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"; step "removed $TMP"' EXIT  # about 1 GB: torch

step "1/3 writing a tiny quantized checkpoint, its exports and their outputs with $MAIN_PY"
"$MAIN_PY" - "$TMP" <<'EOF'
import sys
from pathlib import Path

import torch
from diffusers import DDIMScheduler

from vq4dit.deploy.export import export_diffusers
from vq4dit.deploy.pipeline import ConditionalDiTPipeline, export_pipeline
from vq4dit.deploy.synthetic import random_quantized_dit
from vq4dit.quant.checkpoint import load_quantized, save_quantized
from vq4dit.quant.presets import UniformPreset, VQPreset

tmp = Path(sys.argv[1])
arch = dict(num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=8, num_layers=2,
            sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_eps=1e-6)
g = torch.Generator().manual_seed(0)
inputs = {"x": torch.randn(2, 4, 8, 8, generator=g), "t": torch.tensor([10, 900]), "y": torch.tensor([3, 10])}
expected = {}
for name, preset in {"vq": VQPreset(k=16, d=2), "rtn": UniformPreset(bits=3, group_size=32)}.items():
    model = load_quantized(save_quantized(random_quantized_dit(arch, preset, name="dit_tiny"), tmp / name))
    export_diffusers(model, tmp / f"{name}-diffusers")
    with torch.no_grad():
        expected[name] = model(inputs["x"], inputs["t"], inputs["y"])
pipe = ConditionalDiTPipeline.from_pretrained(export_pipeline(
    model, tmp / "pipeline", DDIMScheduler(beta_schedule="linear", clip_sample=False), num_inference_steps=2))
pipe.set_progress_bar_config(disable=True)
expected["pipeline"] = pipe([1, 7], generator=torch.Generator().manual_seed(0), output_type="pt").images
torch.save({"inputs": inputs, "expected": expected}, tmp / "reference.pt")
EOF

step "2/3 a fresh venv: $TORCH, then the package without extras"
mkdir "$TMP/package"
cp -r pyproject.toml README.md src "$TMP/package/"
rm -rf "$TMP"/package/src/*.egg-info
find "$TMP/package" -name __pycache__ -prune -exec rm -rf {} +
"$MAIN_PY" -m venv "$TMP/venv"
RUNTIME_PY=$TMP/venv/bin/python
"$RUNTIME_PY" -m pip install --quiet --no-compile "$TORCH"
echo "$TORCH" > "$TMP/constraints.txt"
"$RUNTIME_PY" -m pip install --quiet --no-compile "$TMP/package" --constraint "$TMP/constraints.txt"

step "3/3 loading and running in the runtime venv"
"$RUNTIME_PY" - "$TMP" <<'EOF'
import importlib.metadata as metadata
import sys
from pathlib import Path

stack = ["lightning", "pytorch-lightning", "hydra-core", "omegaconf", "torchmetrics", "scikit-learn", "scipy",
         "tensorboard"]
present = []
for name in stack:
    try:
        present.append(f"{name} {metadata.version(name)}")
    except metadata.PackageNotFoundError:
        pass
assert not present, f"installed without extras, yet present: {', '.join(present)}"

import torch
from diffusers import DiTTransformer2DModel

import vq4dit  # noqa: F401  (registers the diffusers backend)
from vq4dit.api import load_quantized
from vq4dit.deploy.pipeline import ConditionalDiTPipeline

tmp = Path(sys.argv[1])
reference = torch.load(tmp / "reference.pt", weights_only=True)
x, t, y = (reference["inputs"][k] for k in ("x", "t", "y"))
for name in ("vq", "rtn"):
    with torch.no_grad():
        ours = load_quantized(tmp / name)(x, t, y)
        theirs = DiTTransformer2DModel.from_pretrained(tmp / f"{name}-diffusers")(x, timestep=t, class_labels=y).sample
    assert torch.equal(ours, reference["expected"][name]), f"load_quantized({name}) differs from the dev venv's"
    assert torch.equal(theirs, reference["expected"][name]), f"from_pretrained({name}) differs from the dev venv's"
pipe = ConditionalDiTPipeline.from_pretrained(tmp / "pipeline")
pipe.set_progress_bar_config(disable=True)
images = pipe([1, 7], generator=torch.Generator().manual_seed(0), output_type="pt").images
assert torch.equal(images, reference["expected"]["pipeline"]), "the pipeline's images differ from the dev venv's"
versions = ", ".join(f"{d} {metadata.version(d)}" for d in ("torch", "diffusers", "accelerate", "safetensors", "numpy"))
print(f"runtime venv ({versions}): load_quantized, from_pretrained and ConditionalDiTPipeline match the dev venv")
EOF
step "runtime check passed"
