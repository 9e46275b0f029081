"""The real Hydra configs compose, and the presets say what the README says they say."""

import math

import pytest
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from vq4dit.models import ConditionalDiT


@pytest.mark.parametrize("preset,bits", [("w2", 2), ("w3", 3), ("w4", 4)])
def test_quant_presets_give_their_bits(compose_cfg, preset, bits):
    cfg = compose_cfg("train", f"quant={preset}")
    assert math.log2(cfg.quant.k) / cfg.quant.d == bits


def test_any_k_d_from_the_command_line(compose_cfg):
    cfg = compose_cfg("train", "quant.k=4096", "quant.d=8")
    assert math.log2(cfg.quant.k) / cfg.quant.d == 1.5


def test_unknown_preset_fails_at_composition(compose_cfg):
    with pytest.raises(ConfigCompositionException, match="w5"):
        compose_cfg("train", "quant=w5")


def test_methods_share_the_calibration_settings(compose_cfg):
    vq4dit, classic, kmeans = (compose_cfg("train", f"method={m}").method for m in ("vq4dit", "classic_vq", "kmeans"))
    assert (vq4dit.iterations, vq4dit.batch_size) == (500, 16)
    assert classic.name == "classic_vq" and classic.lr_codebook == vq4dit.lr_codebook
    assert kmeans.iterations == 0


def test_eval_needs_a_checkpoint(compose_cfg):
    cfg = compose_cfg("eval")
    assert OmegaConf.is_missing(cfg, "ckpt")


def test_tiny_model_instantiates_from_config(compose_cfg):
    cfg = compose_cfg("eval", "model=dit_tiny", "ckpt=none")
    model = instantiate(cfg.model)
    assert isinstance(model, ConditionalDiT) and model.learns_sigma and model.guided_channels == 3
    assert len(model.blocks) == cfg.model.arch.num_layers


def test_xl_needs_local_paths(compose_cfg):
    cfg = compose_cfg("eval", "model=dit_xl_2", "ckpt=x")
    assert OmegaConf.is_missing(cfg.model, "weights") and OmegaConf.is_missing(cfg.model, "vae")
    assert cfg.model.arch.num_layers == 28 and cfg.model.arch.num_attention_heads * cfg.model.arch.attention_head_dim == 1152
