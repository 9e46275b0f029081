"""A checkpoint never chooses code: the manifest's model record is data that `load_dit` builds, whatever it
names. A tampered record (another `_target_`, one nested in a field, an unknown field, a value of the wrong type)
is one UserError line and nothing it names runs (the code it names would leave a marker file); an untampered
checkpoint, with or without the `_target_` that train.py's records carry, loads and computes as before. The
diffusers folder's config is held to the same rule."""

import json
import os
import subprocess
import sys
from contextlib import suppress
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from vq4dit.deploy.synthetic import random_quantized_dit
from vq4dit.errors import UserError
from vq4dit.quant.checkpoint import load_quantized, save_quantized
from vq4dit.quant.presets import VQPreset

ROOT = Path(__file__).resolve().parents[1]
MARKER_ENV = "VQ4DIT_TEST_MARKER"
MARKING = "test_manifest_code.leave_a_marker"  # tests/ is on sys.path (conftest), as for stand_in_inception
TINY = dict(num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
            patch_size=2, num_embeds_ada_norm=10, norm_eps=1e-6)
INPUTS = (torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([3, 900]),
          torch.tensor([1, 10]))


def leave_a_marker(*args, **kwargs):
    """What a tampered record names: called, it writes the marker file (the test asserts it never appears)."""
    Path(os.environ[MARKER_ENV]).write_text("called\n")
    return 2


@pytest.fixture
def marker(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "marker"
    monkeypatch.setenv(MARKER_ENV, str(path))
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[Path, torch.Tensor]:
    """A small quantized checkpoint (VQ k=16, d=2) and its in-memory model's outputs on INPUTS."""
    model = random_quantized_dit(TINY, VQPreset(16, 2), name="dit_tiny")
    with torch.no_grad():
        expected = model(*INPUTS)
    return save_quantized(model, tmp_path_factory.mktemp("clean") / "ckpt"), expected


def tampered(folder: Path, tmp_path: Path, change) -> Path:
    """A copy of the checkpoint whose manifest's model record went through `change(record)` (in place)."""
    copy = tmp_path / "tampered"
    copy.mkdir()
    (copy / "model.safetensors").symlink_to(folder / "model.safetensors")
    manifest = json.loads((folder / "manifest.json").read_text())
    change(manifest["model"])
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def setting(path: str, value):
    """change(record): the field at the dotted `path` (`arch.num_layers`) set to `value`."""
    *parents, last = path.split(".")

    def change(record: dict) -> None:
        for key in parents:
            record = record[key]
        record[last] = value

    return change


TAMPERED = {  # case -> (change, what the one line names)
    "target os.system": (setting("_target_", "os.system"), "_target_='os.system'"),
    "target builtins.eval": (setting("_target_", "builtins.eval"), "_target_='builtins.eval'"),
    "target that marks": (setting("_target_", MARKING), f"_target_='{MARKING}'"),
    "nested target in arch": (setting("arch.num_layers", {"_target_": MARKING}), "arch.num_layers={'_target_'"),
    "nested target in a field": (setting("vae", {"_target_": MARKING}), "vae={'_target_'"),
    "unknown field": (setting("hook", {"_target_": MARKING}), "'hook', which is not a model field"),
    "hydra's positional arguments": (setting("_args_", ["touch marker"]), "'_args_', which is not a model field"),
    "unknown arch key": (setting("arch.evil", 1), "'evil', which is not a DiTTransformer2DModel argument"),
    "arch value as a string": (setting("arch.num_layers", "2"), "arch.num_layers='2' is str; it takes int"),
    "arch value as a float": (setting("arch.num_layers", 2.5), "arch.num_layers=2.5 is float; it takes int"),
    "arch value as a bool": (setting("arch.patch_size", True), "arch.patch_size=True is bool; it takes int"),
    "field of the wrong type": (setting("latent_scale", "1.0"), "latent_scale='1.0' is str"),
    "arch not a dict": (setting("arch", [2, 32]), "arch=[2, 32] is list; it takes dict"),
}


@pytest.mark.parametrize("case", TAMPERED)
def test_a_tampered_model_record_is_one_line_and_runs_nothing(checkpoint, tmp_path, marker, case):
    change, named = TAMPERED[case]
    folder = tampered(checkpoint[0], tmp_path, change)
    with pytest.raises(UserError) as err:
        load_quantized(folder)
    message = str(err.value)
    assert "\n" not in message and named in message and "manifest.json: model" in message, message
    if "_target_=" in named:
        assert "valid: 'vq4dit.models.load_dit'" in message
    if "which is not" in named:
        assert "valid: " in message
    assert not marker.exists()


def test_the_marking_records_would_run_under_the_former_loader(checkpoint, tmp_path, marker):
    """The cases above are live: Hydra's instantiate of such a record (the former loader, on a version-4 record
    that names `load_dit`) calls what it names."""
    stored = json.loads((checkpoint[0] / "manifest.json").read_text())["model"]
    for case in ("target that marks", "nested target in arch", "nested target in a field", "unknown field"):
        record = json.loads(json.dumps({"_target_": "vq4dit.models.load_dit", **stored}))  # a deep copy
        TAMPERED[case][0](record)
        with suppress(Exception):
            instantiate(OmegaConf.create(record), weights=None, empty=True)
        assert marker.exists(), case
        marker.unlink()


def test_a_model_record_that_is_no_record_is_one_line(checkpoint, tmp_path):
    folder = tampered(checkpoint[0], tmp_path, lambda record: None)
    manifest = json.loads((folder / "manifest.json").read_text())
    for bad, named in ((MARKING, "model is str, not a model record"), (None, "model is null")):
        (folder / "manifest.json").write_text(json.dumps({**manifest, "model": bad}))
        with pytest.raises(UserError, match=named) as err:
            load_quantized(folder)
        assert "\n" not in str(err.value)
    del manifest["model"]["arch"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="lacks arch; a model record needs name and arch"):
        load_quantized(folder)


def test_an_arch_diffusers_cannot_build_is_one_line(checkpoint, tmp_path):
    folder = tampered(checkpoint[0], tmp_path, setting("arch.norm_type", "layer_norm"))
    with pytest.raises(UserError, match="its model record builds no dit_tiny") as err:
        load_quantized(folder)
    assert "\n" not in str(err.value)


def test_an_untampered_checkpoint_loads_and_computes_as_before(checkpoint):
    folder, expected = checkpoint
    record = json.loads((folder / "manifest.json").read_text())["model"]
    assert "_target_" not in record  # a record is data: the loader knows its builder
    with torch.no_grad():
        assert torch.equal(load_quantized(folder)(*INPUTS), expected)
        assert torch.equal(load_quantized(folder, decode="once")(*INPUTS), expected)


def test_records_of_earlier_checkpoints_still_load(checkpoint, tmp_path):
    """Version-4 records name `_target_: vq4dit.models.load_dit`; train.py's also hold its model config's weights
    and VAE paths and seed: they load to the same outputs, and the recorded VAE path is not opened."""

    def as_train_py_wrote_it(record: dict) -> None:
        record.update({"_target_": "vq4dit.models.load_dit", "weights": "/elsewhere/DiT.pt", "seed": 0,
                       "vae": "/elsewhere/sd-vae-ft-ema"})

    folder = tampered(checkpoint[0], tmp_path, as_train_py_wrote_it)
    model = load_quantized(folder)
    assert model.vae is None and model.guided_channels == 3
    with torch.no_grad():
        assert torch.equal(model(*INPUTS), checkpoint[1])


def test_a_callers_model_config_is_compared_and_built_by_the_same_builder(compose_cfg, tmp_path, marker):
    """eval.py passes its model config: it must match the record (written as the model config, or as the model's
    own record, which names every argument), and the record is still checked."""
    cfg = compose_cfg("eval", "model=dit_tiny", "ckpt=x")
    model = random_quantized_dit(dict(cfg.model.arch), VQPreset(16, 2), name="dit_tiny")
    own = save_quantized(model, tmp_path / "own")
    folder = save_quantized(model, tmp_path / "ckpt", {"model": OmegaConf.to_container(cfg.model, resolve=True)})
    with torch.no_grad():
        assert torch.equal(load_quantized(folder, cfg.model)(*INPUTS), model(*INPUTS))
        assert torch.equal(load_quantized(own, cfg.model)(*INPUTS), model(*INPUTS))
    bad = tampered(folder, tmp_path, setting("_target_", MARKING))
    with pytest.raises(UserError, match=f"_target_='{MARKING}'"):
        load_quantized(bad, cfg.model)
    other = compose_cfg("eval", "model=dit_tiny", "ckpt=x", "model.arch.num_layers=3")
    with pytest.raises(UserError, match="arch.num_layers=2, not model=dit_tiny's 3; pass model.arch.num_layers=2"):
        load_quantized(folder, other.model)
    assert not marker.exists()


def test_export_py_refuses_a_tampered_checkpoint_in_one_line(checkpoint, tmp_path, marker):
    """The exit path: `python export.py` on a checkpoint whose record names code ends in one `error:` line,
    status 2, and neither the marker nor the output folder exists."""
    folder = tampered(checkpoint[0], tmp_path, setting("_target_", MARKING))
    path = os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")])  # what the record names would be importable
    env = {**os.environ, "PROJECT_ROOT": str(ROOT), "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    result = subprocess.run([sys.executable, "export.py", f"ckpt={folder}", f"out={tmp_path / 'out'}",
                             f"paths.log_dir={tmp_path / 'logs'}"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 2 and len(errors) == 1 and MARKING in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr + result.stdout
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_a_diffusers_folder_names_no_torch_attribute(checkpoint, tmp_path):
    """The exported config's tensor dtypes are looked up in a fixed table, never with getattr on torch."""
    from diffusers import DiTTransformer2DModel

    from vq4dit.deploy.export import export_diffusers

    folder = export_diffusers(load_quantized(checkpoint[0]), tmp_path / "export")
    config = json.loads((folder / "config.json").read_text())
    layer = next(iter(config["quantization_config"]["layers"]))
    config["quantization_config"]["layers"][layer]["tensors"]["codebook"] = "load"
    (folder / "config.json").write_text(json.dumps(config))
    named = f"layers\\['{layer}'\\].tensors\\['codebook'\\]='load'; valid: float64"
    with pytest.raises(UserError, match=named) as err:
        DiTTransformer2DModel.from_pretrained(folder)
    assert "\n" not in str(err.value)
