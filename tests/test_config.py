"""The real Hydra configs compose, and the presets say what the README says they say."""

import math

import pytest
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from vq4dit.cli.build import build_method
from vq4dit.methods import GPTQ, RTN, ClassicVQ, KMeansVQ, PTQ4DiT, QDiT, VQ4DiT
from vq4dit.models import ConditionalDiT
from vq4dit.quant.presets import UniformPreset, VQPreset


@pytest.mark.parametrize("preset,bits", [("w2", 2), ("w3", 3), ("w4", 4)])
def test_vq_presets_give_their_bits(compose_cfg, preset, bits):
    cfg = compose_cfg("train", f"quant={preset}")
    quant = instantiate(cfg.quant)
    assert isinstance(quant, VQPreset) and math.log2(cfg.quant.k) / cfg.quant.d == bits == quant.bits


@pytest.mark.parametrize("preset,bits,group", [("w2g64", 2, 64), ("w3g64", 3, 64), ("w4g64", 4, 64),
                                               ("w2pc", 2, None), ("w3pc", 3, None), ("w4pc", 4, None)])
def test_uniform_presets_say_bits_and_groups(compose_cfg, preset, bits, group):
    quant = instantiate(compose_cfg("train", "method=rtn", f"quant={preset}").quant)
    assert quant == UniformPreset(bits=bits, group_size=group, symmetric=False, name=preset)


def test_any_k_d_from_the_command_line(compose_cfg):
    cfg = compose_cfg("train", "quant.k=4096", "quant.d=8")
    assert instantiate(cfg.quant).bits == 1.5


@pytest.mark.parametrize("method,cls,preset", [("rtn", RTN, "w4g64"), ("gptq", GPTQ, "w4g64"),
                                               ("kmeans", KMeansVQ, "w3"), ("classic_vq", ClassicVQ, "w3"),
                                               ("vq4dit", VQ4DiT, "w3"), ("qdit", QDiT, "w4a8"),
                                               ("ptq4dit", PTQ4DiT, "w8a8")])
def test_every_method_config_builds_its_method_with_its_default_preset(compose_cfg, method, cls, preset):
    cfg = compose_cfg("train", f"method={method}")
    built = build_method(cfg)
    assert type(built) is cls and built.name == method and built.quant.name == preset
    assert built.act.name == ("a8" if preset.endswith("a8") else "none")


@pytest.mark.parametrize("overrides,bits,act", [(["quant=w4a8"], 4, "a8"), (["quant=w8a8", "act=a6"], 8, "a6"),
                                                (["method=qdit", "act=none"], 4, "none"), (["act=a4"], None, "a4")])
def test_wa_presets_select_their_activations_and_the_command_line_wins(compose_cfg, overrides, bits, act):
    cfg = compose_cfg("train", "method=rtn", *overrides)
    assert cfg.act.name == act and (bits is None or cfg.quant.bits == bits)


def test_unknown_preset_fails_at_composition(compose_cfg):
    with pytest.raises(ConfigCompositionException, match="w5"):
        compose_cfg("train", "quant=w5")


def test_fitting_methods_share_the_design_card_fit(compose_cfg):
    fit = instantiate(compose_cfg("train").fit)
    assert (fit.iterations, fit.batch_size) == (500, 16)
    assert ClassicVQ.fits and VQ4DiT.fits and not (KMeansVQ.fits or RTN.fits or GPTQ.fits)


def test_eval_needs_a_checkpoint(compose_cfg):
    cfg = compose_cfg("eval")
    assert OmegaConf.is_missing(cfg, "ckpt")


def test_tiny_model_instantiates_from_config(compose_cfg):
    cfg = compose_cfg("train", "model=dit_tiny")  # (eval.py's model takes its weights from ckpt)
    model = instantiate(cfg.model)
    assert isinstance(model, ConditionalDiT) and model.learns_sigma and model.guided_channels == 3
    assert len(model.blocks) == cfg.model.arch.num_layers


def test_xl_needs_local_paths(compose_cfg):
    cfg = compose_cfg("eval", "model=dit_xl_2", "ckpt=x")
    assert cfg.model.weights == "x" and OmegaConf.is_missing(cfg.model, "vae")  # eval.py's weights are its ckpt
    assert OmegaConf.is_missing(compose_cfg("train", "model=dit_xl_2").model, "weights")
    assert (cfg.model.arch.num_layers == 28
            and cfg.model.arch.num_attention_heads * cfg.model.arch.attention_head_dim == 1152)


def test_rtn_depends_on_the_seed_only_through_static_activation_scales(compose_cfg):
    seeded = lambda *o: build_method(compose_cfg("train", "method=rtn", *o)).seeded  # noqa: E731
    assert not seeded("quant=w4g64") and seeded("quant=w4a8")
    assert not seeded("quant=w4a8", "act.granularity=token", "act.dynamic=true")
