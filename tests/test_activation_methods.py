"""Activation quantization through `train.py` on the tiny model, for methods with static, learned and dynamic
quantizers: where the quantizers sit, that fits see them, that static scales survive save -> load in a fresh
process and that eval.py's loading samples exactly the calibrated model; bad act settings stop before any work."""

import copy
import json
import subprocess
import sys

import pytest
import torch

from vq4dit.cli.evaluate import load_model
from vq4dit.cli.quantize import quantize
from vq4dit.errors import UserError, instantiate
from vq4dit.quant import act_quantizer
from vq4dit.quant.act_quantizer import input_quantizer_of
from vq4dit.quant.attention_quantizer import QuantizedAttnProcessor
from vq4dit.quant.checkpoint import quantized_layers
from vq4dit.sampling import balanced_labels
from vq4dit.seeds import stream_seed

FAST = ["model=dit_tiny", "fit.iterations=12", "pool.trajectories=4", "pool.size=96", "pool.heldout_trajectories=2",
        "pool.heldout_size=32", "sampler.steps=6", "log_samples=0", "trainer.enable_progress_bar=false"]
SETTINGS = {  # name -> (overrides, sites with an input quantizer, granularity, dynamic)
    "rtn-w4a8": (["method=rtn", "quant=w4a8"], {"qkv", "proj", "fc1", "fc2"}, "tensor", False),
    "ptq4dit-w4a8": (["method=ptq4dit", "quant=w4a8"], {"qkv", "proj", "fc1", "fc2", "adaln"}, "tensor", False),
    "vq4dit-w3-a6": (["method=vq4dit", "quant=w3", "quant.k=16", "quant.d=2", "act=a6",
                      "act.granularity=token_group", "act.group_size=16"], {"qkv", "proj", "fc1", "fc2"},
                     "token_group", False),
    "gptq-w4a8-a4": (["method=gptq", "quant=w4a8", "act=a4", "act.granularity=token", "act.dynamic=true",
                      "act.attention=true"], {"qkv", "proj", "fc1", "fc2"}, "token", True),
}
SITE_OF = {"attn1.to_q": "qkv", "attn1.to_k": "qkv", "attn1.to_v": "qkv", "attn1.to_out.0": "proj",
           "ff.net.0.proj": "fc1", "ff.net.2": "fc2", "norm1.linear": "adaln"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Per setting: (config, checkpoint, in-memory model, quantizer calls made with gradients during the run)."""
    from hydra import compose, initialize_config_dir

    from tests.conftest import ROOT
    from vq4dit.calibration.pipeline import quantize_model

    made, out, grad_calls = {}, {}, []
    forward = act_quantizer.ActQuantizer.forward

    def counting(self, x):
        if torch.is_grad_enabled():
            grad_calls.append(1)
        return forward(self, x)

    def keep(*args, **kwargs):
        result = quantize_model(*args, **kwargs)
        made["model"] = copy.deepcopy(result.model)
        return result

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("vq4dit.cli.quantize.quantize_model", keep)
        mp.setattr(act_quantizer.ActQuantizer, "forward", counting)
        for name, (overrides, *_) in SETTINGS.items():
            tmp = tmp_path_factory.mktemp(name)
            with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
                cfg = compose("train", overrides=[f"paths.output_dir={tmp / 'run'}", f"paths.log_dir={tmp / 'logs'}",
                                                  *FAST, *overrides])
            grad_calls.clear()
            out[name] = (cfg, quantize(cfg), made.pop("model"), len(grad_calls))
    return out


@pytest.mark.parametrize("name", list(SETTINGS))
def test_quantizers_sit_where_the_method_puts_them(runs, name):
    cfg, ckpt, model, _ = runs[name]
    _, sites, granularity, dynamic = SETTINGS[name]
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert set(manifest["method"]["act"]["sites"]) == sites
    for block in model.blocks:
        for layer_name, site in SITE_OF.items():
            quantizer = input_quantizer_of(block.get_submodule(layer_name))
            if site not in sites:
                assert quantizer is None
                continue
            assert quantizer.bits == cfg.act.bits and quantizer.granularity == granularity
            assert quantizer.dynamic == dynamic and "scale" not in dict(quantizer.named_parameters())
        q, k, v = (input_quantizer_of(block.get_submodule(f"attn1.to_{c}")) for c in "qkv")
        assert q is k is v  # the fused qkv reads one quantized input
        assert isinstance(block.attn1.processor, QuantizedAttnProcessor) == cfg.act.attention
    assert ("attention_quantizers" in manifest) == cfg.act.attention


def test_fits_train_through_the_quantized_activations(runs):
    assert runs["vq4dit-w3-a6"][3] > 0 and runs["ptq4dit-w4a8"][3] > 0  # quantizers ran inside the fits
    assert runs["rtn-w4a8"][3] == 0  # nothing fits in RTN


def test_static_scales_survive_save_and_load_in_a_fresh_process(runs, tmp_path):
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([10, 500, 900]), torch.tensor([1, 2, 10])
    torch.save({"x": x, "t": t, "y": y}, tmp_path / "inputs.pt")
    script = (
        "import sys, torch\n"
        "from vq4dit.quant.checkpoint import load_quantized, quantized_layers\n"
        "from vq4dit.quant.act_quantizer import input_quantizer_of\n"
        f"inp = torch.load({str(tmp_path / 'inputs.pt')!r}, weights_only=True)\n"
        "outs = {}\n"
        "for name, path in zip(sys.argv[1::2], sys.argv[2::2]):\n"
        "    model = load_quantized(path)\n"
        "    scales = {n: input_quantizer_of(l).scale for n, l in quantized_layers(model).items()\n"
        "              if input_quantizer_of(l) is not None and not input_quantizer_of(l).dynamic}\n"
        "    with torch.no_grad():\n"
        "        outs[name] = (model(inp['x'], inp['t'], inp['y']), scales)\n"
        f"torch.save(outs, {str(tmp_path / 'outputs.pt')!r})\n"
    )
    args = [a for name, (_, ckpt, _, _) in runs.items() for a in (name, str(ckpt))]
    result = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    reloaded = torch.load(tmp_path / "outputs.pt", weights_only=True)
    for name, (_, _, in_memory, _) in runs.items():
        out, scales = reloaded[name]
        expected = {n: input_quantizer_of(layer).scale for n, layer in quantized_layers(in_memory).items()
                    if input_quantizer_of(layer) is not None and not input_quantizer_of(layer).dynamic}
        assert scales.keys() == expected.keys() and (len(scales) > 0) == (not SETTINGS[name][3])
        assert all(torch.equal(scales[n], expected[n]) for n in scales)
        with torch.no_grad():
            assert torch.equal(out, in_memory(x, t, y)), name


def eval_images(cfg, model) -> torch.Tensor:
    """The images eval.py samples (its labels, its noise stream), without scoring them."""
    labels = balanced_labels(cfg.num_samples, model.num_classes)
    return instantiate(cfg.sampler).sample(model, labels, seed=stream_seed(cfg.seed, "eval"))


def test_eval_loads_and_samples_exactly_the_calibrated_model(runs, compose_cfg):
    cfg, ckpt, in_memory, _ = runs["ptq4dit-w4a8"]
    eval_cfg = compose_cfg("eval", "model=dit_tiny", f"ckpt={ckpt}", "num_samples=4", "sampler.steps=6")
    loaded = eval_images(eval_cfg, load_model(eval_cfg.model, eval_cfg.ckpt))
    calibrated = eval_images(eval_cfg, in_memory)
    assert torch.equal(loaded, calibrated)


def test_decode_once_keeps_each_layers_activation_quantizer(runs):
    """decode=once swaps every quantized layer for a dense nn.Linear; the layer's input quantizer goes with it,
    so both decode modes compute the same function (and not the same weights on fp activations)."""
    from vq4dit.quant.checkpoint import load_quantized

    _, ckpt, _, _ = runs["rtn-w4a8"]
    per_forward, once = load_quantized(ckpt, decode="per_forward"), load_quantized(ckpt, decode="once")
    name = next(n for n in quantized_layers(per_forward) if n.endswith("ff.net.2"))
    layer, dense = per_forward.transformer.get_submodule(name), once.transformer.get_submodule(name)
    assert isinstance(dense, torch.nn.Linear) and input_quantizer_of(dense) is not None
    x = torch.randn(2, 16, dense.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(dense(x), layer(x), atol=1e-5, rtol=1e-5)
        fp_activations = torch.nn.functional.linear(x, dense.weight, dense.bias)
    assert (fp_activations - dense(x)).abs().max() > 1e-3


def test_activation_quantization_costs_accuracy_and_more_bits_cost_less(runs, compose_cfg, tmp_path):
    """The quantized activations are real: the same RTN weights with a4 activations are further from fp than
    with a8, and a8 further than with fp activations (block MSE on held-out rows)."""
    errors = {}
    for act in ("none", "a8", "a4"):
        cfg = compose_cfg("train", *FAST, "method=rtn", "quant=w8a8", f"act={act}",
                          f"paths.output_dir={tmp_path / act}")
        blocks = json.loads((quantize(cfg) / "manifest.json").read_text())["blocks"]
        errors[act] = sum(b["shipped_mse"] for b in blocks)
    assert errors["none"] < errors["a8"] < errors["a4"], errors


@pytest.mark.parametrize("overrides,message", [
    (["act=a8", "act.granularity=token_group", "act.group_size=48"],
     "act.group_size=48 does not divide the input width 64 of qkv"),
    (["act=a8", "act.granularity=token_group"], "act.granularity=token_group needs act.group_size"),
    (["act=a8", "act.bits=1"], r"act.bits=1; valid: an integer in \[2, 16\]"),
    (["act=a8", "act.granularity=channel"], "act.granularity=channel; valid: tensor, token, token_group"),
    (["act=a8", "act.granularity=token", "act.dynamic=false"], "act.granularity=token with act.dynamic=false"),
    (["act=none", "act.attention=true"], "act.attention=true with act.bits=null"),
    (["method=ptq4dit", "quant=w4"], "quant=w4 is a vq preset .*method=ptq4dit needs a uniform preset"),
])
def test_bad_act_settings_stop_before_any_work(compose_cfg, tmp_path, overrides, message):
    with pytest.raises(UserError, match=message) as err:
        quantize(compose_cfg("train", *FAST, "method=rtn", "quant=w4a8", *overrides))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "logs" / "train" / "cache").exists() and not (tmp_path / "run" / "checkpoint").exists()
