"""Every setting is defined once, in its class: the config files, the CLI's preflight and the Python API all take
it from there. A method written outside the project (one module, one YAML) runs through train.py and the API and
its checkpoints are the same bytes."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler
from safetensors.torch import load_file

from vq4dit.api import Sampler, UniformPreset, calibration_pool, load_quantized, quantize_model, save_quantized
from vq4dit.cli.settings_configs import SETTINGS_GROUPS, settings_class
from vq4dit.models import load_dit
from vq4dit.quant.uniform_linear import UniformLinear
from vq4dit.settings import defaults, rules

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model=dit_tiny", "pool.trajectories=2", "pool.size=32", "pool.heldout_trajectories=1", "pool.heldout_size=8",
        "sampler.steps=4", "log_samples=0", "trainer.enable_progress_bar=false", "threads=1"]


def cli(script: Path, *args: str, cwd: Path = ROOT, pythonpath: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "PROJECT_ROOT": str(cwd), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (pythonpath, str(ROOT / "src")) if p)}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, str(script), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def as_override(key: str, value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return f"{key}={'null' if value is None else text}"


def settings_overrides(group: str, cls: type, values: dict) -> list[str]:
    out = []
    for name, value in values.items():
        if isinstance(rules(cls)[name], type):  # a nested settings class
            out += settings_overrides(f"{group}.{name}", rules(cls)[name], value)
        else:
            out.append(as_override(f"{group}.{name}", value))
    return out


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (ROOT / "configs" / group).glob("*.yaml"))


def test_config_files_restate_no_default():
    """An option file holds `_target_` and deliberate overrides only: no value equal to its class's default."""
    import yaml

    for group in SETTINGS_GROUPS:
        for option in options(group):
            text = yaml.safe_load((ROOT / "configs" / group / f"{option}.yaml").read_text())
            cls = settings_class(text["_target_"])
            assert cls is not None, (group, option)
            restated = {k: v for k, v in text.items() if k in defaults(cls) and defaults(cls)[k] == v}
            assert not restated, f"configs/{group}/{option}.yaml restates defaults {restated}"


@pytest.mark.parametrize("method", options("method"))
def test_every_default_passes_the_cli_preflight(method):
    """Each method's settings at their class defaults, typed on the command line, get past train.py's preflight
    (it once refused Q-DiT's own advice, method.search.generations=0, and every metric=imagenet run)."""
    cls = settings_class(_target("method", method))
    given = settings_overrides("method", cls, defaults(cls))
    if method == "vq4dit":  # and the other settings groups' defaults, once
        for group, option in (("fit", "block_loss"), ("model_fit", "default"), ("pool", "zero_data")):
            group_cls = settings_class(_target(group, option))
            given += settings_overrides(group, group_cls, defaults(group_cls))
    result = cli(ROOT / "train.py", f"method={method}", *given, "--cfg", "job")
    assert result.returncode == 0, result.stderr


def _target(group: str, option: str) -> str:
    import yaml

    return yaml.safe_load((ROOT / "configs" / group / f"{option}.yaml").read_text())["_target_"]


@pytest.mark.slow
def test_qdit_without_search_and_imagenet_eval_pass_the_preflight(tmp_path):
    qdit = cli(ROOT / "train.py", "method=qdit", "method.search.generations=0", "--cfg", "job")
    assert qdit.returncode == 0, qdit.stderr
    stand_in = tmp_path / "file"
    stand_in.write_text("")
    imagenet = cli(ROOT / "eval.py", "metric=imagenet", f"ckpt={ROOT / 'data' / 'dit_digits'}",
                   f"metric.inception_weights={stand_in}", f"metric.reference={stand_in}", "--cfg", "job")
    assert imagenet.returncode == 0, imagenet.stderr
    refused = cli(ROOT / "train.py", "method=qdit", "method.search.generations=-1", "--cfg", "job")
    assert (refused.returncode, refused.stderr) == (2, "error: method.search.generations=-1; valid: an integer >= 0\n")
    unknown = cli(ROOT / "train.py", "method=qdit", "method.search.name_of_nothing=1", "--cfg", "job")
    assert unknown.returncode == 2 and unknown.stderr.count("\n") == 1 and "name_of_nothing" in unknown.stderr


SHRUNK_RTN = '''
    """A method written outside the project: RTN of the weight scaled by a new setting `shrink`."""
    import copy
    from dataclasses import dataclass

    from vq4dit.methods import RTN
    from vq4dit.settings import setting


    @dataclass
    class ShrunkRTN(RTN):
        shrink: float = setting(1.0, low=0, high=1, low_open=True)
        name = "shrunk_rtn"

        def start(self, linears, data):
            shrunk = {}
            for name, linear in linears.items():
                shrunk[name] = copy.deepcopy(linear)
                shrunk[name].weight.data.mul_(self.shrink)
            return super().start(shrunk, data)
'''


@pytest.fixture(scope="module")
def outside_project(tmp_path_factory) -> Path:
    """A user's copy of the entry point and configs, plus one module and one YAML of their own method."""
    home = tmp_path_factory.mktemp("user")
    shutil.copytree(ROOT / "configs", home / "configs")
    shutil.copy(ROOT / "train.py", home / "train.py")
    (home / "data").symlink_to(ROOT / "data")  # the reference models the default configs name
    (home / "shrunk_rtn.py").write_text(textwrap.dedent(SHRUNK_RTN))
    (home / "configs" / "method" / "shrunk_rtn.yaml").write_text("_target_: shrunk_rtn.ShrunkRTN\n")
    return home


@pytest.mark.slow
def test_a_method_defined_outside_runs_through_train_py_and_the_api_to_the_same_bytes(outside_project, tmp_path):
    home = outside_project
    refused = cli(home / "train.py", "method=shrunk_rtn", "method.shrink=2", "--cfg", "job", cwd=home,
                  pythonpath=str(home))
    assert (refused.returncode, refused.stderr) == (2, "error: method.shrink=2; valid: a number in (0, 1]\n")
    run = cli(home / "train.py", "method=shrunk_rtn", "quant=w4g64", "method.shrink=0.5", *TINY,
              f"paths.log_dir={tmp_path / 'logs'}", cwd=home, pythonpath=str(home))
    assert run.returncode == 0, run.stderr
    cli_ckpt = Path(run.stdout.split("checkpoint: ")[1].split()[0])
    cli_manifest = json.loads((cli_ckpt / "manifest.json").read_text())
    assert cli_manifest["method"]["name"] == "shrunk_rtn" and cli_manifest["method"]["shrink"] == 0.5

    sys.path.insert(0, str(home))
    try:
        from shrunk_rtn import ShrunkRTN
    finally:
        sys.path.remove(str(home))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # the same run through the Python API: the dit_tiny model and the ddpm sampler as the configs give them
        model = load_dit(name="dit_tiny", weights=None, seed=0, timestep_shift=0, guided_channels=3,
                         arch=dict(num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=8,
                                   num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_eps=1e-6))
        fp_weight = model.blocks[0].ff.net[2].weight.detach().clone()
        scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                                  clip_sample=False, variance_type="fixed_small")
        pool = calibration_pool(model, Sampler(scheduler, steps=4, guidance_scale=2.0, batch_size=250), trajectories=2,
                                size=32, heldout_trajectories=1, heldout_size=8, progress=False)
        result = quantize_model(model, ShrunkRTN(UniformPreset(bits=4, group_size=64), shrink=0.5), pool,
                                progress=False)
        api_ckpt = save_quantized(result, tmp_path / "api")
    finally:
        torch.set_num_threads(threads)
    assert json.loads((api_ckpt / "manifest.json").read_text()) == cli_manifest
    assert (api_ckpt / "model.safetensors").read_bytes() == (cli_ckpt / "model.safetensors").read_bytes()

    # what the setting did, checked against RTN of the halved weight directly
    halved = torch.nn.Linear(fp_weight.shape[1], fp_weight.shape[0])
    halved.weight.data = fp_weight * 0.5
    expected = UniformLinear.from_linear(halved, 4, 64, False).dequantize()
    loaded = load_quantized(cli_ckpt)
    assert torch.equal(loaded.blocks[0].ff.net[2].dequantize(), expected)
    assert load_file(cli_ckpt / "model.safetensors").keys() == load_file(api_ckpt / "model.safetensors").keys()
