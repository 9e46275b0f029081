"""The model-level fit (`model_fit=outputs`): the whole quantized model fitted to the fp model's outputs with its
codes fixed, shipped only if it lowers the held-out output error, on the configured device."""

import copy

import lightning as L
import pytest
import torch
from conftest import ROOT
from hydra import compose, initialize_config_dir

from vq4dit.calibration.model_fit import ModelCalibration, ModelFitSettings, fit_model, model_outputs
from vq4dit.calibration.pipeline import default_trainer, quantize_model
from vq4dit.calibration.zero_data import ZeroDataBlockInputs
from vq4dit.errors import UserError, instantiate
from vq4dit.methods import KMeansVQ
from vq4dit.quant.presets import VQPreset
from vq4dit.quant.vq_linear import VQLinear

META = torch.device("meta")


@pytest.fixture(scope="module")
def prepared():
    """The reference DiT at 2-bit plain k-means (no block fit), its pool, and the fp model's outputs on it."""
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["sampler.steps=10", "trainer.enable_progress_bar=false"])
    fp = instantiate(cfg.model)
    pool = ZeroDataBlockInputs(fp, instantiate(cfg.sampler), 4, 160, seed=0, heldout_trajectories=2,
                               heldout_size=40, progress=False)
    device = torch.device("cpu")
    targets = model_outputs(fp, (pool.inputs, pool.timesteps, pool.labels), device, "fp32")
    model = copy.deepcopy(fp)
    quantize_model(model, KMeansVQ(VQPreset(k=256, d=4), kmeans_iters=10), pool, device=device, progress=False)
    part = lambda rows: (pool.inputs[rows], pool.timesteps[rows], pool.labels[rows], targets[rows])  # noqa: E731
    return fp, model, part(pool.train_rows), part(pool.heldout_rows), default_trainer(
        device, trainer=instantiate(cfg.trainer))


@pytest.fixture
def quantized(prepared):
    fp, model, *rest = prepared
    return (fp, copy.deepcopy(model), *rest)  # every test fits its own copy


def _vq_layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, VQLinear)}


@pytest.mark.slow
def test_the_fit_lowers_heldout_output_error_and_changes_only_codebooks_and_biases(quantized):
    fp, model, train, heldout, trainer = quantized
    before = {name: (m.codes.clone(), m.codebook.detach().clone()) for name, m in _vq_layers(model).items()}
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if ".codebook" not in name
              and not (name.endswith(".bias") and name.rsplit(".", 1)[0] in _vq_layers(model))}
    held = []  # every step: whether each VQ layer held its codes unpacked (what the fit cannot change)
    probe = L.Callback()
    probe.on_train_batch_start = lambda _, module, *rest: held.append(
        [m.held_codes is not None for m in _vq_layers(module.model).values()])
    stats = fit_model(model, train, heldout, ModelFitSettings(iterations=40, lr=1e-4),
                      lambda **kw: trainer(callbacks=[probe], **kw), torch.device("cpu"), "fp32", seed=0)
    assert len(held) == 40 and all(all(step) and step for step in held)
    assert all(m.held_codes is None for m in _vq_layers(model).values())  # released after the fit
    # measured here independently of the fit's own bookkeeping: the fp model's outputs against the fitted model's
    x, t, y, target = heldout
    with torch.no_grad():
        error = torch.nn.functional.mse_loss(model(x, t, y), fp(x, t, y)).item()
    assert stats["kept"] == "fit" and error == pytest.approx(stats["fitted_mse"], rel=1e-4)
    assert stats["fitted_mse"] < 0.9 * stats["start_mse"]
    for name, m in _vq_layers(model).items():
        assert torch.equal(m.codes, before[name][0])  # codes never train
    assert any(not torch.equal(m.codebook, before[n][1]) for n, m in _vq_layers(model).items())
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name
    assert not any(p.requires_grad for p in model.parameters())


@pytest.mark.slow
def test_a_fit_that_does_not_help_is_undone(quantized):
    _, model, train, heldout, trainer = quantized
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    stats = fit_model(model, train, heldout, ModelFitSettings(iterations=5, lr=10.0), trainer, torch.device("cpu"),
                      "fp32", seed=0)
    assert stats["kept"] == "blocks" and stats["fitted_mse"] > stats["start_mse"]
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name


@pytest.mark.slow
def test_a_training_step_touches_only_the_models_device(quantized):
    _, model, train, _, _ = quantized
    module = ModelCalibration(copy.deepcopy(model).to(META), ModelFitSettings(iterations=1))
    loss = module.training_step(tuple(r[:4].to(META) for r in train), 0)
    assert loss.device == META
    loss.backward()
    grads = [p.grad for p in module.trainable]
    assert grads and all(g is not None and g.device == META for g in grads)


def test_model_fit_settings_are_checked():
    with pytest.raises(UserError, match="model_fit.iterations=-1"):
        ModelFitSettings(iterations=-1)
    with pytest.raises(UserError, match="model_fit.lr=0"):
        ModelFitSettings(lr=0)


@pytest.mark.slow
def test_the_fitted_model_is_exactly_what_its_checkpoint_reloads(quantized, tmp_path):
    """The fit trains fp32 codebooks; what ships (and what the fit is scored on) is the fp16-stored checkpoint."""
    from vq4dit.quant.checkpoint import load_quantized, save_quantized

    _, model, train, heldout, trainer = quantized
    fit_model(model, train, heldout, ModelFitSettings(iterations=10, lr=1e-4), trainer, torch.device("cpu"),
              "fp32", seed=0)
    reloaded = load_quantized(save_quantized(model, tmp_path / "ckpt", {"seed": 0}))
    x, t, y, _ = heldout
    with torch.no_grad():
        assert torch.equal(reloaded(x[:8], t[:8], y[:8]), model(x[:8], t[:8], y[:8]))
