"""A checkpoint that proves itself: every stored tensor's sha256 is in the manifest (and in an exported diffusers
folder's config) and checked as the tensor is read; every layer record is checked against its tensors (a uniform
layer's `symmetric` flag against its zero points, codes against the grid); a cached block carries the record of
the method that made it and is refused when it is not what the running method deploys. Each case loaded or
resumed silently before these checks."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_reliability_cli import LAYER, flip_a_byte_of

import vq4dit  # noqa: F401  (registers the diffusers backend)
from vq4dit.calibration.block_cache import block_digest
from vq4dit.cli.quantize import quantize
from vq4dit.deploy.export import export_diffusers
from vq4dit.deploy.synthetic import random_quantized_dit
from vq4dit.errors import UserError
from vq4dit.quant.act_quantizer import ActQuantizer, attach_input_quantizer
from vq4dit.quant.checkpoint import DIGESTS, load_quantized, quantized_layers, save_quantized, tensor_digests
from vq4dit.quant.presets import UniformPreset, VQPreset

TINY = dict(num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
            patch_size=2, num_embeds_ada_norm=10, norm_eps=1e-6)
INPUTS = (torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([3, 900]),
          torch.tensor([1, 9]))


def saved(tmp_path: Path, preset, name: str = "ckpt", model=None) -> Path:
    model = model or random_quantized_dit(TINY, preset, name="dit_tiny")
    return save_quantized(model, tmp_path / name)


def edited(ckpt: Path, edit, redigest: bool = True) -> Path:
    """`edit(manifest, tensors)` applied in place; with `redigest`, the digests rewritten to match the edited
    tensors (a writer that got a record wrong, not a damaged file: the checks behind the digest)."""
    manifest = json.loads((ckpt / "manifest.json").read_text())
    tensors = load_file(ckpt / "model.safetensors")
    edit(manifest, tensors)
    if redigest:
        manifest[DIGESTS] = tensor_digests(tensors)
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    save_file(tensors, ckpt / "model.safetensors")
    return ckpt


def refused(ckpt: Path, *named: str) -> str:
    with pytest.raises(UserError) as err:
        load_quantized(ckpt)
    line = str(err.value)
    assert "\n" not in line
    for text in named:
        assert text in line, (text, line)
    return line


# -- the digest ------------------------------------------------------------------------------------------------

def test_every_stored_tensor_has_its_sha256_in_the_manifest(tmp_path):
    ckpt = saved(tmp_path, VQPreset(16, 2))
    manifest = json.loads((ckpt / "manifest.json").read_text())
    with safe_open(ckpt / "model.safetensors", "pt") as f:
        assert set(manifest[DIGESTS]) == set(f.keys())
    assert manifest["version"] == 5


@pytest.mark.parametrize("tensor", [f"{LAYER}.codes_packed", f"{LAYER}.codebook", "proj_out_2.weight"])
def test_a_flipped_byte_is_refused_naming_the_tensor(tmp_path, tensor):
    ckpt = saved(tmp_path, VQPreset(16, 2))
    flip_a_byte_of(ckpt, tensor)
    refused(ckpt, f"tensor {tensor} does not match its sha256", str(ckpt))


def test_a_checkpoint_from_before_the_digest_still_loads_and_a_stripped_digest_is_refused(tmp_path):
    model = random_quantized_dit(TINY, VQPreset(16, 2), name="dit_tiny")
    with torch.no_grad():
        expected = model(*INPUTS)
    ckpt = saved(tmp_path, None, model=model)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    digests = manifest.pop(DIGESTS)
    (ckpt / "manifest.json").write_text(json.dumps(manifest))  # version 5 without its digests: edited
    refused(ckpt, DIGESTS, "version-5")
    (ckpt / "manifest.json").write_text(json.dumps({**manifest, "version": 4}))  # as version 4 wrote it
    with torch.no_grad():
        assert torch.equal(load_quantized(ckpt)(*INPUTS), expected)
    (ckpt / "manifest.json").write_text(json.dumps({**manifest, DIGESTS: {**digests, "extra": "0" * 64}}))
    assert load_quantized(ckpt) is not None  # a digest of no stored tensor changes nothing that is read


def test_an_exported_diffusers_folder_checks_its_digests(tmp_path):
    from diffusers import DiTTransformer2DModel

    model = random_quantized_dit(TINY, UniformPreset(4, 32), name="dit_tiny")
    folder = export_diffusers(load_quantized(save_quantized(model, tmp_path / "ckpt")), tmp_path / "export")
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert len(config["tensor_sha256"]) == len(load_file(folder / "diffusion_pytorch_model.safetensors"))
    assert DiTTransformer2DModel.from_pretrained(folder, torch_dtype=torch.bfloat16) is not None  # cast after the check
    for tensor in (f"{LAYER}.codes_packed", "proj_out_2.weight"):
        damaged = tmp_path / tensor
        shutil.copytree(folder, damaged)
        flip_a_byte_of(damaged, tensor, "diffusion_pytorch_model.safetensors")
        with pytest.raises(UserError, match=rf"tensor {tensor} does not match its sha256 in config.json"):
            DiTTransformer2DModel.from_pretrained(damaged)


# -- records against their tensors -------------------------------------------------------------------------------

def _flip_symmetric(manifest, tensors):
    record = manifest["layers"][LAYER]
    record["symmetric"] = not record["symmetric"]


def _flip_symmetric_and_drop_zero_points(manifest, tensors):
    _flip_symmetric(manifest, tensors)
    del manifest["layers"][LAYER]["tensors"]["zero_packed"]


@pytest.mark.parametrize("symmetric,edit,named", [
    (False, _flip_symmetric, ["symmetric=true, but the layer stores zero points", "valid: symmetric=false"]),
    (False, _flip_symmetric_and_drop_zero_points, []),  # its codes off the symmetric grid, or the zero points left
    (True, _flip_symmetric, ["symmetric=false, but the layer stores no zero points"]),
], ids=["asym -> sym", "asym -> sym, zero points unlisted", "sym -> asym"])
def test_a_uniform_record_whose_symmetric_flag_disagrees_with_its_zero_points_is_refused(tmp_path, symmetric, edit,
                                                                                          named):
    """Asymmetric -> symmetric loaded silently before: every weight decoded around 2^(b-1) - 1 instead of its
    group's zero point (the issue's digits-DiT case)."""
    ckpt = edited(saved(tmp_path, UniformPreset(4, 32, symmetric)), edit)
    refused(ckpt, LAYER, *named)


def test_a_symmetric_code_off_the_grid_is_refused(tmp_path):
    """Symmetric codes are -(2^(b-1) - 1)..2^(b-1) - 1, stored shifted: 15 at 4 bits decodes to 8 steps."""
    def off_grid(manifest, tensors):
        tensors[f"{LAYER}.codes_packed"][0] = 0xFF
    ckpt = edited(saved(tmp_path, UniformPreset(4, 32, True)), off_grid)
    refused(ckpt, LAYER, "code 15", "0..14")


def test_a_vq_code_past_k_is_refused(tmp_path):
    def past_k(manifest, tensors):  # 4-bit codes, k = 12: code 15 would read past the codebook
        manifest["layers"][LAYER]["k"] = 12
        tensors[f"{LAYER}.codebook"] = tensors[f"{LAYER}.codebook"][:12].clone()
        tensors[f"{LAYER}.codes_packed"][0] = 0xFF
    refused(edited(saved(tmp_path, VQPreset(16, 2)), past_k), LAYER, "code 15", "0..11")


def _record(field, value):
    def edit(manifest, tensors):
        manifest["layers"][LAYER][field] = value
    return edit


def _scale(value):
    def edit(manifest, tensors):
        tensors[f"{LAYER}.scale"][0, 0] = value
    return edit


def _dtype(manifest, tensors):
    tensors[f"{LAYER}.scale"] = tensors[f"{LAYER}.scale"].float()


@pytest.mark.parametrize("edit,named", [
    (_record("bits", 4.0), ["bits=4.0", "an integer in 2..8"]),
    (_record("group_size", 0), ["group_size=0", "an integer >= 1"]),
    (_record("symmetric", "false"), ["symmetric='false'", "true or false"]),
    (_scale(0.0), ["scale", "<= 0", "positive"]),
    (_dtype, ["scale is float32, its record says float16"]),
], ids=["bits float", "group size 0", "symmetric string", "zero scale", "dtype"])
def test_a_uniform_record_is_checked_field_by_field(tmp_path, edit, named):
    refused(edited(saved(tmp_path, UniformPreset(4, 32)), edit), LAYER, *named)


def _with_input_quantizers(symmetric: bool):
    model = random_quantized_dit(TINY, VQPreset(16, 2), name="dit_tiny")
    for layer in quantized_layers(model).values():
        quantizer = ActQuantizer(8, "tensor", dynamic=False, symmetric=symmetric, width=layer.in_features)
        quantizer.scale.fill_(0.05)
        quantizer.zero.fill_(0.0 if symmetric else 120.0)
        attach_input_quantizer(layer, quantizer)
    return model


def _act(field, value):
    def edit(manifest, tensors):
        manifest["layers"][LAYER]["input_quantizer"][field] = value
    return edit


def _fractional_zero(manifest, tensors):
    tensors[f"{LAYER}.input_quantizer.zero"][0] = 120.5


@pytest.mark.parametrize("symmetric,edit,named", [
    (False, _act("symmetric", True), ["input quantizer record symmetric=true, but it stores zero points"]),
    (True, _act("symmetric", False), ["input quantizer record symmetric=false, but it stores no zero points"]),
    (False, _act("dynamic", True), ["input_quantizer.scale that its record does not use"]),
    (False, _act("width", 32), ["width=32; valid: the layer's input width 64"]),
    (False, _fractional_zero, ["input_quantizer.zero holds non-integer zero points"]),
], ids=["asym -> sym", "sym -> asym", "static -> dynamic", "width", "fractional zero"])
def test_an_input_quantizer_record_is_checked_against_its_tensors(tmp_path, symmetric, edit, named):
    ckpt = saved(tmp_path, None, model=_with_input_quantizers(symmetric))
    assert load_quantized(ckpt) is not None
    refused(edited(ckpt, edit), LAYER, *named)


# -- cached blocks -------------------------------------------------------------------------------------------------

FAST = ["model=dit_tiny", "fit.iterations=4", "pool.trajectories=2", "pool.size=32", "pool.heldout_trajectories=1",
        "pool.heldout_size=8", "sampler.steps=2", "log_samples=0", "trainer.enable_progress_bar=false"]
KMEANS, RTN = ["method=kmeans", "quant.k=16", "quant.d=2"], ["method=rtn", "quant=w4pc"]


@pytest.fixture
def two_caches(compose_cfg, tmp_path):
    """The cache folders of a finished k-means run and of a finished RTN run of the same model, and the k-means
    command that resumes from its cache."""
    rerun = lambda name: compose_cfg("train", *FAST, *KMEANS, f"paths.output_dir={tmp_path / name}")  # noqa: E731
    quantize(rerun("kmeans"))
    quantize(compose_cfg("train", *FAST, *RTN, f"paths.output_dir={tmp_path / 'rtn'}"))
    caches = tmp_path / "logs" / "train" / "cache"
    kmeans, rtn = (next(caches.glob(f"dit_tiny-*-{m}-*")) for m in ("kmeans", "rtn"))
    return kmeans, rtn, rerun


def _forge(source: Path, target: Path, key: str, method: str | None = None, redigest: bool = False) -> None:
    """`source`'s block written as `target` under the cache key `key` (and another method record), its digest
    recomputed when `redigest` (a forger with this code at hand)."""
    tensors = load_file(source)
    with safe_open(source, "pt") as f:
        header = dict(f.metadata())
    header["key"] = key
    if method is not None:
        header["method"] = method
    if redigest:
        header["digest"] = block_digest(tensors, header)
    save_file(tensors, target, metadata=header)


def _header(path: Path) -> dict:
    with safe_open(path, "pt") as f:
        return dict(f.metadata())


@pytest.mark.parametrize("forgery,named", [
    (dict(), "made by method=rtn"),                       # the key alone edited (resumed before: RTN layers shipped)
    (dict(redigest=True), "made by method=rtn"),          # and the digest recomputed
    ("method", "layer attn1.to_q has layer_type=uniform; method=kmeans"),  # and the method record forged too
], ids=["key", "key + digest", "key + method record + digest"])
def test_a_block_of_another_method_with_a_forged_key_is_refused(two_caches, tmp_path, forgery, named):
    kmeans, rtn, rerun = two_caches
    own = kmeans / "block_000.safetensors"
    if forgery == "method":
        forgery = dict(method=_header(own)["method"], redigest=True)
    _forge(rtn / "block_000.safetensors", own, kmeans.name, **forgery)
    with pytest.raises(UserError, match=rf"cached block .*block_000.safetensors .*{named}.*rerun with resume=false"):
        quantize(rerun("again"))
    assert not (tmp_path / "again" / "checkpoint").exists()


def test_a_block_of_another_preset_under_a_forged_record_is_refused(two_caches, compose_cfg, tmp_path):
    kmeans, _, rerun = two_caches
    quantize(compose_cfg("train", *FAST, "method=kmeans", "quant.k=8", "quant.d=2",
                         f"paths.output_dir={tmp_path / 'k8'}"))
    other = next(p for p in kmeans.parent.glob("dit_tiny-k8-d2-kmeans-*"))
    own = kmeans / "block_001.safetensors"
    _forge(other / "block_001.safetensors", own, kmeans.name, _header(own)["method"], redigest=True)
    with pytest.raises(UserError, match=r"block_001.safetensors .*has k=8; method=kmeans with quant=k16-d2 "
                                        "deploys k=16"):
        quantize(rerun("again"))


def test_a_block_without_a_method_record_is_refused(two_caches):
    kmeans, _, rerun = two_caches
    own = kmeans / "block_001.safetensors"
    header = _header(own)
    _forge(own, own, kmeans.name, method="", redigest=True)
    assert _header(own)["key"] == header["key"]
    with pytest.raises(UserError, match="block_001.safetensors .*carries no method record"):
        quantize(rerun("again"))
