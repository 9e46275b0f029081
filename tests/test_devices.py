"""Nothing in calibration assumes the CPU. This machine has no GPU, so the `meta` device stands in for "another
device": modules and rows placed there must run there up to the first numeric read. Code that moves tensors to
wherever Lightning thinks a module is (`LightningModule.device` is `cpu` for a module built outside a Trainer,
and again after the Trainer's teardown) fails these tests with a device mismatch instead."""

import copy

import pytest
import torch

from vq4dit.calibration.block_calibration import BlockCalibration
from vq4dit.errors import instantiate
from vq4dit.methods import FitSettings, VQ4DiT
from vq4dit.methods.block_data import BlockData, with_layers
from vq4dit.quant.block_layers import block_linears
from vq4dit.quant.presets import VQPreset
from vq4dit.quant.vq_linear import SoftVQLinear

META = torch.device("meta")


@pytest.fixture
def block_and_rows(compose_cfg):
    model = instantiate(compose_cfg("train", "model=dit_tiny").model)
    block = model.blocks[0]
    n, tokens, hidden = 12, 16, block.norm1.linear.in_features
    rows = (torch.randn(n, tokens, hidden), torch.randint(0, 1000, (n,)), torch.randint(0, 10, (n,)),
            torch.randn(n, tokens, hidden))
    return block, rows


def test_block_error_is_computed_on_the_configured_device(block_and_rows):
    block, rows = block_and_rows
    data = BlockData(copy.deepcopy(block).to(META), 0, rows, rows, META, seed=0)  # rows stay in host memory
    mse = data.heldout_mse(data.block)
    assert mse.device == META and mse.shape == ()


def test_layer_inputs_are_observed_on_the_configured_device(block_and_rows):
    block, rows = block_and_rows
    data = BlockData(copy.deepcopy(block).to(META), 0, rows, rows, META, seed=0)
    seen = []
    data.observe_inputs(list(block_linears(block)), lambda name, x: seen.append((name, x.device)))
    assert {device for _, device in seen} == {META} and len(seen) == 7


def test_calibration_scores_on_the_students_device_not_on_lightnings(block_and_rows):
    """Built outside a Trainer, the module reports device cpu while its student lives elsewhere: scoring must go
    where the student is (here it runs until `.item()`, the first numeric read, which meta cannot answer)."""
    block, rows = block_and_rows
    student = copy.deepcopy(block)
    layers = {name: SoftVQLinear.from_linear(linear, 16, 2, 2, iters=5)
              for name, linear in block_linears(block).items()}
    student = with_layers(student, layers).to(META)
    data = BlockData(copy.deepcopy(block).to(META), 0, rows, rows, META, seed=0)
    module = BlockCalibration(student, layers, VQ4DiT(VQPreset(k=16, d=2)), FitSettings(), data)
    assert module.device == torch.device("cpu")  # what Lightning believes
    with pytest.raises(RuntimeError, match=r"item\(\) cannot be called on meta tensors"):
        module.heldout_mse()


def test_a_training_step_touches_only_the_students_device(block_and_rows):
    block, rows = block_and_rows
    layers = {name: SoftVQLinear.from_linear(linear, 16, 2, 2, iters=5)
              for name, linear in block_linears(block).items()}
    student = with_layers(copy.deepcopy(block), layers).to(META)
    layers = {name: student.get_submodule(name) for name in layers}
    data = BlockData(copy.deepcopy(block).to(META), 0, rows, rows, META, seed=0)
    module = BlockCalibration(student, layers, VQ4DiT(VQPreset(k=16, d=2)), FitSettings(), data)
    batch = tuple(t.to(META) for t in rows)  # what the Trainer hands over on the accelerator
    loss = module.training_step(batch, 0)
    assert loss.device == META
    loss.backward()
    assert all(layer.logits.grad is not None and layer.logits.grad.device == META for layer in layers.values())


def test_calibration_keeps_label_embedders_in_eval_mode(block_and_rows):
    """Lightning puts the module in train mode for fit; diffusers' label embedder would then drop labels at
    random. The student must stay in eval mode, so its output equals the fp block's on the same input."""
    block, rows = block_and_rows
    data = BlockData(copy.deepcopy(block), 0, rows, rows, torch.device("cpu"), seed=0)
    module = BlockCalibration(copy.deepcopy(block), {}, VQ4DiT(VQPreset(k=16, d=2)), FitSettings(), data)
    module.train()
    embedder = module.student.norm1.emb.class_embedder
    assert embedder.dropout_prob > 0 and not embedder.training and module.training
    h, t, y, _ = rows
    torch.testing.assert_close(module(h, t, y), block(h, timestep=t, class_labels=y))


def test_activation_quantizers_are_calibrated_on_the_configured_device(block_and_rows):
    from vq4dit.methods import RTN
    from vq4dit.quant.presets import ActPreset, UniformPreset

    block, rows = block_and_rows
    data = BlockData(copy.deepcopy(block).to(META), 0, rows, rows, META, seed=0)
    quantizers = RTN(UniformPreset(bits=4), ActPreset(bits=8)).input_quantizers(block_linears(block), data)
    assert len(quantizers) == 6 and {q.scale.device for q in quantizers.values()} == {META}
    x = torch.randn(2, 16, 64, device=META)
    assert quantizers["attn1.to_q"](x).device == META
