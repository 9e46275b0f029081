"""The configured method with its presets, built from a composed config: what train.py's preflight, its job and
the benchmarks share (light: the method classes and presets, no Lightning or model code)."""

from dataclasses import replace
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from vq4dit.errors import instantiate
from vq4dit.methods.base import Method


def build_method(cfg: DictConfig) -> Method:
    """The configured method with its presets; a preset of another family is refused with one line."""
    make = instantiate(cfg.method, _partial_=True, _convert_="all")  # (an object passed to instantiate would
    return make(quant=named_preset(cfg, "quant"), act=named_preset(cfg, "act"))  # be turned back into a config)


def named_preset(cfg: DictConfig, group: str):
    """The preset of `group`, named as configured while its values are the named preset's; changed values are
    named by themselves (`quant=w3 quant.k=3` is `k3-d2`, not w3), so no manifest or cache folder names something
    else."""
    preset = instantiate(cfg[group])
    named = Path(cfg.paths.root_dir) / "configs" / group / f"{cfg[group].name}.yaml"
    values = OmegaConf.load(named) if named.is_file() else None
    if values is not None and all(cfg[group].get(k) == v for k, v in values.items() if k != "defaults"):
        return preset
    return replace(preset, name=preset.values_name())
