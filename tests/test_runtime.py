"""The runtime needs nothing of the training stack: in an interpreter where Lightning, Hydra, omegaconf,
torchmetrics, scikit-learn, SciPy and TensorBoard cannot be imported, `load_quantized`, the exported folder's
`from_pretrained` and `ConditionalDiTPipeline` load and compute exactly what they compute here; the calibration
names of `vq4dit.api` then say which extra they need. pyproject.toml declares that runtime, and the diffusers range
the loader accepts. (.ci/runtime_check.sh installs the package without extras into a fresh venv and runs a
forward there.)"""

import re
import subprocess
import sys
from pathlib import Path

import diffusers
import pytest
import torch
from diffusers import DDIMScheduler, DiTTransformer2DModel

from vq4dit.deploy.diffusers_quantizer import TESTED_DIFFUSERS, diffusers_version_supported
from vq4dit.deploy.export import export_diffusers
from vq4dit.deploy.pipeline import ConditionalDiTPipeline, export_pipeline
from vq4dit.deploy.synthetic import random_quantized_dit
from vq4dit.errors import UserError
from vq4dit.quant.checkpoint import load_quantized, save_quantized
from vq4dit.quant.presets import UniformPreset, VQPreset

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
            patch_size=2, num_embeds_ada_norm=10, norm_eps=1e-6)
TRAINING_STACK = ("lightning", "pytorch_lightning", "lightning_fabric", "hydra", "omegaconf", "torchmetrics",
                  "sklearn", "scipy", "tensorboard", "tensorboardX")
DISTRIBUTIONS = {"lightning", "pytorch-lightning", "hydra-core", "omegaconf", "torchmetrics", "scikit-learn", "scipy",
                 "tensorboard", "tensorboardx"}
BLOCKED_RUN = """
import importlib.abc, sys
BLOCKED = {blocked!r}


class NotInstalled(importlib.abc.MetaPathFinder):
    # importing a blocked package fails as if it were not installed; the None entries below make
    # importlib.util.find_spec (how diffusers and accelerate probe optional packages) find nothing, as there
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked)", name=name)


sys.meta_path.insert(0, NotInstalled())
sys.modules.update(dict.fromkeys(BLOCKED))

import torch
import vq4dit
from diffusers import DiTTransformer2DModel
from vq4dit.api import load_quantized
from vq4dit.deploy.pipeline import ConditionalDiTPipeline

inp, out_path, folders, checkpoints, pipeline = sys.argv[1], sys.argv[2], sys.argv[3:5], sys.argv[5:7], sys.argv[7]
inp = torch.load(inp, weights_only=True)
outs = {{}}
with torch.no_grad():
    for folder in folders:
        outs[folder] = DiTTransformer2DModel.from_pretrained(folder)(inp["x"], timestep=inp["t"],
                                                                      class_labels=inp["y"]).sample
    for ckpt in checkpoints:
        outs[ckpt] = load_quantized(ckpt)(inp["x"], inp["t"], inp["y"])
pipe = ConditionalDiTPipeline.from_pretrained(pipeline)
pipe.set_progress_bar_config(disable=True)
outs[pipeline] = pipe([1, 7], generator=torch.Generator().manual_seed(0), output_type="pt").images
try:
    from vq4dit.api import quantize_model  # noqa: F401
    outs["calibration"] = "imported"
except ImportError as e:
    outs["calibration"] = str(e)
outs["imported"] = sorted(m for m in BLOCKED if sys.modules.get(m) is not None)
torch.save(outs, out_path)
"""


def ddim() -> DDIMScheduler:
    return DDIMScheduler(beta_schedule="linear", clip_sample=False)


@pytest.fixture(scope="module")
def deployed(tmp_path_factory) -> dict[str, list[Path]]:
    """Tiny quantized checkpoints (VQ and RTN layers), their exported folders and a pipeline folder."""
    tmp = tmp_path_factory.mktemp("deployed")
    out = {"checkpoints": [], "folders": []}
    for name, preset in {"vq": VQPreset(k=16, d=2), "rtn": UniformPreset(bits=3, group_size=32)}.items():
        ckpt = save_quantized(random_quantized_dit(TINY, preset, seed=1, name="dit_tiny"), tmp / name)
        out["checkpoints"].append(ckpt)
        out["folders"].append(export_diffusers(load_quantized(ckpt), tmp / f"{name}-diffusers"))
    out["pipeline"] = [export_pipeline(load_quantized(out["checkpoints"][0]), tmp / "pipeline", ddim(),
                                       guidance_scale=1.5, num_inference_steps=2)]
    return out


def test_loading_and_sampling_need_none_of_the_training_stack(deployed, tmp_path):
    g = torch.Generator().manual_seed(0)
    inputs = {"x": torch.randn(3, 4, 8, 8, generator=g), "t": torch.tensor([5, 400, 999]),
              "y": torch.tensor([0, 9, 10])}
    torch.save(inputs, tmp_path / "inputs.pt")
    paths = [*deployed["folders"], *deployed["checkpoints"], *deployed["pipeline"]]
    script = BLOCKED_RUN.format(blocked=TRAINING_STACK)
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "inputs.pt"), str(tmp_path / "outs.pt"),
                             *map(str, paths)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    theirs = torch.load(tmp_path / "outs.pt", weights_only=True)
    assert theirs["imported"] == []
    assert re.fullmatch(r"vq4dit.api.quantize_model needs the calibration tools and lightning is not installed; "
                        r"valid: pip install 'vq4dit\[calibrate\]' .*", theirs["calibration"])
    with torch.no_grad():
        for folder in deployed["folders"]:
            ours = DiTTransformer2DModel.from_pretrained(folder)(inputs["x"], timestep=inputs["t"],
                                                                  class_labels=inputs["y"]).sample
            assert torch.equal(theirs[str(folder)], ours), folder
        for ckpt in deployed["checkpoints"]:
            assert torch.equal(theirs[str(ckpt)], load_quantized(ckpt)(inputs["x"], inputs["t"], inputs["y"])), ckpt
    pipe = ConditionalDiTPipeline.from_pretrained(deployed["pipeline"][0])
    pipe.set_progress_bar_config(disable=True)
    images = pipe([1, 7], generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert torch.equal(theirs[str(deployed["pipeline"][0])], images)


def test_load_quantized_takes_a_plain_mapping_or_a_hydra_node_as_its_model_config(deployed):
    from omegaconf import OmegaConf

    ckpt = deployed["checkpoints"][0]
    record = {"name": "dit_tiny", "arch": TINY, "timestep_shift": 0, "guided_channels": 3, "latent_scale": 1.0}
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.tensor([2, 10])
    with torch.no_grad():
        expected = load_quantized(ckpt)(x, t, y)
        for cfg in (record, OmegaConf.create(record)):
            assert torch.equal(load_quantized(ckpt, cfg)(x, t, y), expected)
    with pytest.raises(UserError, match="not a model record"):
        load_quantized(ckpt, ["dit_tiny"])


def test_pyproject_declares_that_runtime_and_the_diffusers_range_the_loader_accepts():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    name = lambda requirement: re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower()  # noqa: E731
    runtime = {name(r): r for r in project["dependencies"]}
    assert not set(runtime) & DISTRIBUTIONS, "the training stack belongs to the calibrate extra"
    assert {name(r) for r in project["optional-dependencies"]["calibrate"]} >= DISTRIBUTIONS - {
        "pytorch-lightning", "omegaconf", "tensorboardx"}  # lightning and hydra-core bring those two
    low, high = TESTED_DIFFUSERS
    assert runtime["diffusers"] == f"diffusers>={low},<{high}"
    assert diffusers_version_supported(diffusers.__version__)  # the tests run on a version the range admits
    assert "-e '.[calibrate,test]'" in (ROOT / "Makefile").read_text()
