"""Sampling: seeded and device-independent, balanced labels, both schedulers, classifier-free guidance's model
calls, learned-sigma DDPM, autocast precision, and the learned-sigma preset against ADM's respaced sampler."""

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from torch import nn

from vq4dit.sampling import Sampler, balanced_labels

N = 6  # samples per test: small, and not a multiple of the 10 classes


@pytest.fixture
def tiny(compose_cfg):
    """(compose(sampler, *overrides) -> Sampler, the dit_tiny model: learned sigma, 3 guided channels)."""

    def sampler(name: str = "ddim", *overrides: str) -> Sampler:
        cfg = compose_cfg("eval", "model=dit_tiny", "ckpt=none", "model.weights=null", f"sampler={name}",
                          "sampler.steps=3",
                          "sampler.batch_size=4", *overrides)
        return instantiate(cfg.sampler)

    model = instantiate(compose_cfg("eval", "model=dit_tiny", "ckpt=none", "model.weights=null").model)
    return sampler, model


def _count_calls(model: nn.Module) -> list:
    """Records the (x, t, y) of every forward call of the model."""
    calls = []
    model.register_forward_pre_hook(lambda _, args: calls.append(tuple(a.clone() for a in args)))
    return calls


def test_same_seed_is_bit_identical_and_another_seed_differs(tiny):
    make, model = tiny
    sampler, labels = make(), balanced_labels(N, model.num_classes)
    a = sampler.sample(model, labels, seed=3, progress=False)
    b = sampler.sample(model, labels, seed=3, progress=False)
    c = sampler.sample(model, labels, seed=4, progress=False)
    assert a.shape == (N, model.in_channels, model.sample_size, model.sample_size) and a.device.type == "cpu"
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_device_string_or_torch_device_give_the_same_images(tiny):
    make, model = tiny
    base = make()
    labels = balanced_labels(N, model.num_classes)
    as_string = Sampler(base.scheduler, 3, 1.5, 4, device="cpu")
    as_device = Sampler(base.scheduler, 3, 1.5, 4, device=torch.device("cpu"))
    assert as_device.device == as_string.device == torch.device("cpu")
    assert torch.equal(as_string.sample(model, labels, seed=1, progress=False),
                       as_device.sample(model, labels, seed=1, progress=False))


@pytest.mark.parametrize("n,classes", [(500, 10), (40, 10), (3000, 1000), (7, 7)])
def test_balanced_labels(n, classes):
    labels = balanced_labels(n, classes)
    counts = torch.bincount(labels, minlength=classes)
    assert len(labels) == n and labels.dtype == torch.long
    assert labels.min() >= 0 and labels.max() < classes
    assert counts.max() - counts.min() <= 1 and (n % classes or counts.min() == n // classes)
    assert torch.equal(labels, balanced_labels(n, classes))  # the same list on every call


def test_unbalanced_remainder_goes_to_the_first_classes():
    counts = torch.bincount(balanced_labels(25, 10), minlength=10)
    assert counts.tolist() == [3] * 5 + [2] * 5


@pytest.mark.parametrize("name,scheduler", [("ddpm", "DDPMScheduler"), ("ddim", "DDIMScheduler")])
def test_both_schedulers_run_from_their_configs(tiny, name, scheduler):
    make, model = tiny
    sampler = make(name)
    assert type(sampler.scheduler).__name__ == scheduler and sampler.steps == 3
    calls = _count_calls(model)
    images = sampler.sample(model, balanced_labels(N, model.num_classes), seed=0, progress=False)
    assert images.shape == (N, model.in_channels, 8, 8)
    assert torch.isfinite(images).all() and images.abs().max() <= 1
    assert len(calls) == 3 * 2  # 3 steps for each of the two batches (batch_size 4, 6 samples)
    # the scheduler is copied per batch: the configured one is left as it was
    assert sampler.sample(model, balanced_labels(N, model.num_classes), seed=0, progress=False).equal(images)


def test_without_guidance_the_model_runs_once_per_step_on_the_labels(tiny):
    make, model = tiny
    sampler = make("ddim", "sampler.guidance_scale=1.0", "sampler.batch_size=100")
    labels = balanced_labels(N, model.num_classes)
    calls, hooked = _count_calls(model), []
    sampler.sample(model, labels, seed=0, progress=False, on_step=lambda x, t, y: hooked.append((x, t, y)))
    assert len(calls) == len(hooked) == 3
    for (x, _t, y), (hx, _ht, hy) in zip(calls, hooked):
        assert len(x) == N and torch.equal(y, labels) and torch.equal(x, hx) and torch.equal(hy, y)
    timesteps = [int(t[0]) for _, t, _ in calls]
    assert timesteps == sorted(timesteps, reverse=True) and len(set(timesteps)) == 3


def test_guidance_doubles_the_batch_with_the_null_label(tiny):
    make, model = tiny
    sampler = make("ddim", "sampler.guidance_scale=4.0", "sampler.batch_size=100")
    labels = balanced_labels(N, model.num_classes)
    calls, hooked = _count_calls(model), []
    sampler.sample(model, labels, seed=0, progress=False, on_step=lambda x, t, y: hooked.append(y))
    assert len(calls) == len(hooked) == 3
    for x, t, y in calls:
        assert len(x) == len(t) == len(y) == 2 * N
        assert torch.equal(x[:N], x[N:]) and torch.equal(t[:N], t[N:])
        assert torch.equal(y[:N], labels) and (y[N:] == model.null_label).all()
    assert model.null_label == model.num_classes == 10


class _Stub(nn.Module):
    """cond output 1 everywhere, uncond 0: guided channels become `scale`, the rest stay cond."""

    in_channels, null_label, guided_channels = 4, 10, 3

    def forward(self, x, t, y):
        out = torch.zeros(len(x), 8, *x.shape[2:])
        out[y != self.null_label] = 1.0
        return out


def test_guidance_mixes_only_the_guided_channels():
    sampler = Sampler(scheduler=None, steps=1, guidance_scale=2.5, batch_size=4)
    x, y = torch.zeros(2, 4, 2, 2), torch.tensor([1, 2])
    out = sampler.guided_output(_Stub(), x, torch.tensor(5), y)
    assert out.shape == (2, 8, 2, 2)
    assert (out[:, :3] == 2.5).all() and (out[:, 3:] == 1.0).all()
    stub = _Stub()
    stub.guided_channels = None  # None: guide every input channel (the variance half keeps cond)
    out = sampler.guided_output(stub, x, torch.tensor(5), y)
    assert (out[:, :4] == 2.5).all() and (out[:, 4:] == 1.0).all()


def test_learned_sigma_model_samples_with_learned_range_ddpm(tiny):
    make, model = tiny
    assert model.learns_sigma and model.transformer.out_channels == 2 * model.in_channels == 8
    labels = balanced_labels(N, model.num_classes)
    learned = make("ddpm", "sampler.scheduler.variance_type=learned_range")
    assert learned.scheduler.config.variance_type == "learned_range"
    images = learned.sample(model, labels, seed=0, progress=False)
    assert images.shape == (N, model.in_channels, model.sample_size, model.sample_size)
    assert torch.isfinite(images).all()
    # the predicted variance is used: fixed_small (which drops those channels) gives other images
    fixed = make("ddpm").sample(model, labels, seed=0, progress=False)
    assert fixed.shape == images.shape and not torch.allclose(fixed, images)


@pytest.mark.parametrize("precision,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_precision_runs_the_model_in_that_dtype(tiny, precision, dtype):
    make, model = tiny
    labels = balanced_labels(N, model.num_classes)
    seen = []
    hook = model.blocks[0].ff.net[2].register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    low = make("ddpm", f"sampler.precision={precision}").sample(model, labels, seed=0, progress=False)
    hook.remove()
    full = make("ddpm").sample(model, labels, seed=0, progress=False)
    assert seen and set(seen) == {dtype}  # the block's linear layers ran in low precision
    assert next(model.parameters()).dtype == torch.float32  # the weights themselves stay as they are
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
    assert not torch.equal(low, full) and (low - full).abs().mean() < 0.01  # rounding, not another model


def test_unknown_precision_is_a_user_error(compose_cfg):
    from vq4dit.errors import UserError, instantiate

    cfg = compose_cfg("eval", "ckpt=none", "model.weights=null", "sampler.precision=fp8")
    with pytest.raises(UserError, match="sampler.precision=fp8; valid: fp32, bf16, fp16"):
        instantiate(cfg.sampler)


# --- the learned-sigma preset is the DiT/ADM sampler ------------------------------------------------------------
def adm_timesteps(steps: int, num_timesteps: int = 1000) -> list[int]:
    """guided-diffusion's space_timesteps(1000, [steps]): a float stride accumulated from 0, each rounded."""
    stride = (num_timesteps - 1) / (steps - 1)
    taken, position = [], 0.0
    for _ in range(steps):
        taken.append(round(position))
        position += stride
    return taken


def adm_p_sample(eps, v, x, t: int, prev: int, alphas_cumprod: np.ndarray, noise):
    """One ADM p_sample step (learned_range variance, eps prediction, no clipping) on the respaced chain, float64."""
    abar, abar_prev = alphas_cumprod[t], (alphas_cumprod[prev] if prev >= 0 else 1.0)
    beta = 1 - abar / abar_prev  # the respaced chain's beta at this step
    x0 = np.sqrt(1 / abar) * x - np.sqrt(1 / abar - 1) * eps
    mean = beta * np.sqrt(abar_prev) / (1 - abar) * x0 + (1 - abar_prev) * np.sqrt(1 - beta) / (1 - abar) * x
    min_log = np.log(beta * (1 - abar_prev) / (1 - abar))  # the posterior variance
    frac = (v + 1) / 2
    log_variance = frac * np.log(beta) + (1 - frac) * min_log
    return mean + np.exp(0.5 * log_variance) * noise


@pytest.mark.parametrize("steps", [250, 100, 50])
def test_learned_sigma_preset_is_adm_respaced_p_sample(compose_cfg, steps):
    cfg = compose_cfg("eval", "model=dit_tiny", "ckpt=none", "model.weights=null", "sampler=ddpm_learned_sigma",
                      f"sampler.steps={steps}")
    sampler = instantiate(cfg.sampler)
    assert sampler.guidance_scale == 1.5 and sampler.steps == steps
    scheduler = sampler.scheduler
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps.tolist()
    assert timesteps == adm_timesteps(steps)[::-1]
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)  # DiT's linear schedule
    alphas_cumprod = np.cumprod(1 - betas)
    g = torch.Generator().manual_seed(steps)
    x, eps, v = (torch.randn(2, 4, 3, 3, generator=g) for _ in range(3))
    v = v.clamp(-1, 1)
    for i in (0, steps // 2, steps - 2):  # first, middle and last noisy step
        t, prev = timesteps[i], timesteps[i + 1]
        out = scheduler.step(torch.cat([eps, v], 1), t, x, generator=torch.Generator().manual_seed(i)).prev_sample
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(i))  # the draw step() makes
        expected = adm_p_sample(eps.double().numpy(), v.double().numpy(), x.double().numpy(), t, prev,
                                alphas_cumprod, noise.double().numpy())
        np.testing.assert_allclose(out.numpy(), expected, rtol=1e-4, atol=1e-4)
