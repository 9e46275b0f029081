"""Nothing silently wrong: one schema for every config value, a resume cache keyed and verified by content,
presets and debug presets that keep their meaning, output checks before work, non-finite samples refused, and the
same command giving the same checkpoint bytes at the default thread count."""

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from vq4dit.calibration.pipeline import resolve_student_inputs
from vq4dit.cli.config_schema import CONFIG_KEYS, RULES, rule_for, validate
from vq4dit.cli.entry import check_config
from vq4dit.cli.evaluate import sample_and_score
from vq4dit.cli.quantize import block_cache_folder, build_method, quantize
from vq4dit.cli.settings_configs import settings_class
from vq4dit.errors import UserError
from vq4dit.models.dit import build_transformer, load_dit
from vq4dit.settings import rules

ROOT = Path(__file__).resolve().parents[1]
FAST = ["model=dit_tiny", "fit.iterations=6", "pool.trajectories=2", "pool.size=48", "pool.heldout_trajectories=1",
        "pool.heldout_size=16", "sampler.steps=3", "log_samples=0", "trainer.enable_progress_bar=false",
        "quant.k=16", "quant.d=2"]


def _flat(node, prefix=""):
    """Every leaf key of a config without resolving it (groups with ??? included)."""
    for key, value in node.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _flat(value, f"{full}.")
        else:
            yield full


def _a_setting_of_its_class(cfg, key: str) -> bool:
    """`key` lies in a node whose `_target_` names a settings class, and is one of its fields (or Hydra's)."""
    group, _, rest = key.partition(".")
    cls = settings_class(OmegaConf.select(cfg, f"{group}._target_", default=None))
    if cls is None or not rest:
        return False
    name = rest.split(".")[0]
    return name in CONFIG_KEYS or name in rules(cls)


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (ROOT / "configs" / group).glob("*.yaml") if not p.stem.startswith("_"))


@pytest.mark.parametrize("task,groups", [
    ("train", ["model", "quant", "method", "sampler", "debug"]),
    ("eval", ["model", "metric", "sampler"]),
    ("export", ["model"]),
])
def test_every_option_of_every_config_group_has_a_rule_in_the_one_schema(compose_cfg, task, groups):
    """An option added to any config file without its rule fails here (and is refused at run time)."""
    seen = 0
    for group in groups:
        for option in _options(group):
            cfg = compose_cfg(task, f"{group}={option}", *(["ckpt=x"] if task != "train" else []),
                              *(["out=y"] if task == "export" else []))
            keys = list(_flat(OmegaConf.to_container(cfg, resolve=False)))
            missing = [k for k in keys if rule_for(k) is None and not _a_setting_of_its_class(cfg, k)]
            assert not missing, f"{task} {group}={option}: no rule for {missing}"
            seen += len(keys)
    assert seen > 0


def test_a_setting_without_a_rule_is_refused(compose_cfg):
    cfg = compose_cfg("train", *FAST, "+method.new_switch=1")
    with pytest.raises(UserError, match=r"^method\.new_switch=1: vq4dit\.methods\.VQ4DiT has no setting new_switch; "
                                        r"its settings: kmeans_iters, .*candidates"):
        validate(cfg, skip=())
    assert "method.new_switch" not in RULES


@pytest.mark.parametrize("override,message", [
    ("seed=abc", r"seed=abc; valid: an integer >= 0"),
    ("sampler.guidance_scale=-1", r"sampler.guidance_scale=-1; valid: a number >= 1"),
    ("method.freeze_threshold=5", r"method.freeze_threshold=5; valid: a number in \(0, 1\]"),
    ("method.lr_ratios=-1", r"method.lr_ratios=-1; valid: a number > 0"),
    ("fit.rmsprop_alpha=1", r"fit.rmsprop_alpha=1; valid: a number in \(0, 1\)"),
    ("pool.trajectories=null", None),  # null is valid there: one trajectory per class
    ("devices=[0,0]", r"devices=\[0, 0\] with device=cpu; valid: device=cuda"),  # devices against device
])
def test_schema_types_and_ranges(compose_cfg, override, message):
    cfg = compose_cfg("train", *FAST, override)
    if message is None:
        validate(cfg)
    else:
        with pytest.raises(UserError, match=message):
            validate(cfg)


def test_no_room_for_the_results_is_refused_before_any_work(compose_cfg, tmp_path, monkeypatch):
    cfg = compose_cfg("train", *FAST)
    from vq4dit.cli import outputs

    monkeypatch.setattr(outputs.shutil, "disk_usage", lambda path: SimpleNamespace(free=2**19))
    with pytest.raises(UserError, match=r"MiB free on its disk, this run writes up to"):
        check_config(cfg, ("checkpoint",), lambda c: 2**20)
    check_config(cfg, ("checkpoint",), lambda c: 2**10)  # what fits passes
    assert not (tmp_path / "run").exists()


def test_non_finite_samples_are_refused_before_scoring(compose_cfg):
    cfg = compose_cfg("eval", "ckpt=x", "model.weights=null", "model.arch.num_layers=1", "num_samples=20",
                      "sampler.steps=2")
    model = load_dit(**{k: v for k, v in OmegaConf.to_container(cfg.model).items() if k != "_target_"})
    with torch.no_grad():
        model.transformer.proj_out_2.weight[0, 0] = float("nan")
    with pytest.raises(UserError, match=r"non-finite \(NaN/Inf\) samples"):
        sample_and_score(cfg, model)


# -- presets keep their meaning ------------------------------------------------------------------------------------

def test_a_changed_preset_is_named_by_its_values_and_counts_its_stored_bits(compose_cfg):
    assert build_method(compose_cfg("train", "quant=w3")).quant.name == "w3"
    custom = build_method(compose_cfg("train", "quant=w3", "quant.k=3")).quant
    assert custom.name == "k3-d2" and custom.bits == 1.0  # 3 codewords take 2-bit codes: 1 bit a weight at d 2
    rtn = build_method(compose_cfg("train", "method=rtn", "quant=w4g64", "quant.group_size=32")).quant
    assert rtn.name == "w4g32"
    assert build_method(compose_cfg("train", "method=rtn", "quant=w4g64")).quant.name == "w4g64"


def test_debug_fast_does_not_change_what_a_method_is(compose_cfg, tmp_path):
    """k-means with debug=fast is still plain k-means: the same checkpoint bytes as without it (it has no fit)."""
    plain = quantize(compose_cfg("train", *FAST, "method=kmeans", f"paths.output_dir={tmp_path / 'a'}"))
    debug = quantize(compose_cfg("train", *FAST, "method=kmeans", "debug=fast", f"paths.output_dir={tmp_path / 'b'}"))
    assert (plain / "model.safetensors").read_bytes() == (debug / "model.safetensors").read_bytes()
    manifest = json.loads((debug / "manifest.json").read_text())
    assert manifest["fit"] is None and manifest["method"]["name"] == "kmeans"


# -- the resume cache ----------------------------------------------------------------------------------------------

def _save_tiny(folder: Path, seed: int) -> None:
    arch = OmegaConf.to_container(OmegaConf.load(ROOT / "configs/model/dit_tiny.yaml").arch)
    build_transformer(arch, seed=seed).save_pretrained(folder)


def test_cache_is_keyed_by_the_weights_content_not_their_path(compose_cfg, tmp_path):
    weights = tmp_path / "weights"
    _save_tiny(weights, seed=1)
    run = lambda name, *o: quantize(compose_cfg("train", *FAST, "method=kmeans", f"model.weights={weights}",  # noqa: E731
                                                f"paths.output_dir={tmp_path / name}", *o))
    run("first")
    shutil.rmtree(weights)
    _save_tiny(weights, seed=2)  # other weights at the same path
    second, fresh = run("second"), run("fresh", "resume=false")
    folders = sorted(p.name for p in (tmp_path / "logs" / "train" / "cache").iterdir())
    assert len(folders) == 2  # one per content
    assert (second / "model.safetensors").read_bytes() == (fresh / "model.safetensors").read_bytes()


def test_cache_key_covers_every_setting_that_determines_a_block(compose_cfg, tmp_path):
    def key(*overrides: str) -> str:
        cfg = compose_cfg("train", *FAST, "method=vq4dit", *overrides)
        method = build_method(cfg)
        inputs = resolve_student_inputs(cfg.pool.student_inputs, method)
        return block_cache_folder(cfg, method, tmp_path, "weights digest", inputs).name

    reference = key()
    for override in ("seed=1", "threads=2", "precision=bf16", "fit.lr=0.001", "method.candidates=3",
                     "pool.size=64", "sampler.steps=4", "quant.k=8", "trainer.deterministic=true",
                     "pool.student_inputs=fp"):
        assert key(override) != reference, override
    assert key("sampler.batch_size=7") == reference  # changes no row of the pool


@pytest.fixture
def cached_run(compose_cfg, tmp_path):
    """A finished k-means run and the command that reruns it from its cache."""
    rerun = lambda name: compose_cfg("train", *FAST, "method=kmeans", f"paths.output_dir={tmp_path / name}")  # noqa: E731
    quantize(rerun("first"))
    (folder,) = list((tmp_path / "logs" / "train" / "cache").iterdir())
    return folder, rerun


def test_a_cached_block_is_read_back_unchanged(cached_run, tmp_path):
    folder, rerun = cached_run
    again, fresh = quantize(rerun("again")), (tmp_path / "first" / "checkpoint")
    assert (again / "model.safetensors").read_bytes() == (fresh / "model.safetensors").read_bytes()


def _flip_a_data_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10  # in the tensors, past the header: the file still parses
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-40])


@pytest.mark.parametrize("damage,reason", [
    (_flip_a_data_byte, "do not match their digest"),
    (_truncate, "unusable"),
])
def test_a_damaged_cached_block_is_refused_with_the_way_out(cached_run, damage, reason):
    folder, rerun = cached_run
    damage(folder / "block_001.safetensors")
    with pytest.raises(UserError, match=rf"cached block .*block_001.safetensors .*{reason}.*rerun with resume=false"):
        quantize(rerun("again"))


def test_a_block_of_another_run_is_refused(cached_run, compose_cfg, tmp_path):
    folder, rerun = cached_run
    quantize(compose_cfg("train", *FAST, "method=kmeans", "seed=1", f"paths.output_dir={tmp_path / 'other'}"))
    other = next(p for p in folder.parent.iterdir() if p != folder)
    shutil.copy(other / "block_000.safetensors", folder / "block_000.safetensors")
    with pytest.raises(UserError, match=r"written for another run.*rerun with resume=false"):
        quantize(rerun("again"))
    assert load_file(folder / "block_001.safetensors")  # the rest of the cache stays


# -- the same command, the same bytes --------------------------------------------------------------------------------

@pytest.mark.slow
def test_the_same_command_gives_the_same_checkpoint_bytes_at_the_default_threads(compose_cfg, tmp_path):
    """Two uninterrupted runs of a fitting method at the default config (threads as configured)."""
    cfgs = [compose_cfg("train", *FAST, "method=vq4dit", "fit.iterations=24", "resume=false",
                        f"paths.output_dir={tmp_path / name}") for name in ("a", "b")]
    assert cfgs[0].threads == 1
    first, second = (quantize(cfg) for cfg in cfgs)
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()


@pytest.mark.slow
def test_a_real_block_gives_the_same_bytes_twice_at_the_default_threads(compose_cfg):
    """Block 0 of the reference digits DiT, VQ4DiT w3, 50 fit steps, at the configured default `threads`: two
    runs store the same bytes. (At 2 threads two such runs differed: README, "Reliability".)"""
    from vq4dit.calibration.block_cache import tensors_digest
    from vq4dit.calibration.pipeline import quantize_model
    from vq4dit.calibration.zero_data import ZeroDataBlockInputs
    from vq4dit.cli.quantize import torch_threads
    from vq4dit.errors import instantiate
    from vq4dit.methods.base import FitSettings
    from vq4dit.quant.checkpoint import quantized_layers

    cfg = compose_cfg("train", "quant=w3", "sampler.steps=20")
    digests = []
    for _ in range(2):
        with torch_threads(cfg.threads):
            model, sampler = instantiate(cfg.model), instantiate(cfg.sampler)
            pool = ZeroDataBlockInputs(model, sampler, 16, 256, 0, 2, 64, progress=False)
            quantize_model(model, build_method(cfg), pool, fit=FitSettings(iterations=50), blocks=[0], progress=False)
        digests.append(tensors_digest({f"{name}.{key}": t for name, layer in quantized_layers(model).items()
                                       for key, t in layer.stored()[0].items()}))
    assert digests[0] == digests[1]
