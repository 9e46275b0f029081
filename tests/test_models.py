"""The diffusers-based DiT against an independent oracle of the original DiT (tests/reference_dit.py):
weight conversion, output equality, checkpoint round trips, classifier-free guidance and checkpoint errors."""

import argparse
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).parent))
from reference_dit import ReferenceDiT, random_original_state_dict  # noqa: E402

from vq4dit.errors import UserError  # noqa: E402
from vq4dit.models import load_dit  # noqa: E402
from vq4dit.models.checkpoint_io import read_state_dict  # noqa: E402
from vq4dit.models.dit import build_transformer  # noqa: E402
from vq4dit.models.original_format import from_original, to_original  # noqa: E402
from vq4dit.sampling import Sampler  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "model"
TINY = OmegaConf.to_container(OmegaConf.load(CONFIGS / "dit_tiny.yaml").arch)  # learned sigma, out 8
# the same shape without learned sigma, and one with more heads, another patch size and another class count
EPS_ONLY = {**TINY, "out_channels": TINY["in_channels"], "num_layers": 3}
WIDER = {**TINY, "num_attention_heads": 4, "attention_head_dim": 16, "patch_size": 4, "sample_size": 16,
         "num_embeds_ada_norm": 7}
ARCHS = {"dit_tiny": TINY, "eps_only": EPS_ONLY, "wider": WIDER}


def hidden(arch: dict) -> int:
    return arch["num_attention_heads"] * arch["attention_head_dim"]


def original_state(arch: dict, seed: int = 0, **override) -> dict:
    kw = dict(depth=arch["num_layers"], hidden=hidden(arch), heads=arch["num_attention_heads"],
              patch=arch["patch_size"], input_size=arch["sample_size"], in_ch=arch["in_channels"],
              out_ch=arch["out_channels"], num_classes=arch["num_embeds_ada_norm"], seed=seed)
    kw.update(override)
    return random_original_state_dict(**kw)


def oracle(arch: dict, state: dict) -> ReferenceDiT:
    return ReferenceDiT(state, hidden=hidden(arch), heads=arch["num_attention_heads"], patch=arch["patch_size"],
                        input_size=arch["sample_size"], in_channels=arch["in_channels"],
                        out_channels=arch["out_channels"])


def inputs(arch: dict, batch: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, arch["in_channels"], arch["sample_size"], arch["sample_size"], generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    # every label including the null label (the CFG row of the embedding table)
    y = torch.randint(0, arch["num_embeds_ada_norm"] + 1, (batch,), generator=g)
    return x, t, y


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def converted_model(arch: dict, state: dict, timestep_shift: float) -> torch.nn.Module:
    transformer = build_transformer(dict(arch), timestep_shift=timestep_shift)
    transformer.load_state_dict(from_original(state, arch["num_layers"]))
    transformer.eval()
    return transformer


def run(transformer, x, t, y) -> torch.Tensor:
    with torch.no_grad():
        return transformer(x, timestep=t, class_labels=y, return_dict=False)[0]


def save_pt(obj, path: Path) -> Path:
    torch.save(obj, path)
    return path


def assert_one_line_naming(err: pytest.ExceptionInfo, path: Path) -> str:
    msg = str(err.value)
    assert "\n" not in msg and "\r" not in msg, msg
    assert str(path) in msg, msg
    return msg


# --- (a) conversion + numerical equality with the original -------------------------------------------------
@pytest.mark.parametrize("name", list(ARCHS))
def test_converted_weights_match_original_forward(name):
    arch = ARCHS[name]
    state = original_state(arch)
    x, t, y = inputs(arch)
    ours = run(converted_model(arch, state, timestep_shift=0), x, t, y)
    ref = oracle(arch, state)(x, t, y)
    assert ours.shape == ref.shape == (len(x), arch["out_channels"], arch["sample_size"], arch["sample_size"])
    assert ref.abs().mean() > 1e-2  # a non-trivial output, not zeros on both sides
    assert rel_err(ours, ref) < 1e-4


def test_diffusers_default_timestep_shift_does_not_match():
    state = original_state(TINY)
    x, t, y = inputs(TINY)
    ref = oracle(TINY, state)(x, t, y)
    assert rel_err(run(converted_model(TINY, state, timestep_shift=1), x, t, y), ref) > 1e-2
    assert rel_err(run(converted_model(TINY, state, timestep_shift=0), x, t, y), ref) < 1e-4


# --- (b) round trips ---------------------------------------------------------------------------------------
def test_original_pt_round_trip(tmp_path):
    state = original_state(TINY, seed=3)
    path = save_pt(state, tmp_path / "DiT-tiny.pt")
    model = load_dit("dit_tiny", TINY, weights=str(path), guided_channels=3)
    assert not model.transformer.training and model.learns_sigma and model.null_label == TINY["num_embeds_ada_norm"]
    back = to_original(model.transformer.state_dict(), TINY["num_layers"])
    assert set(back) == set(state) - {"pos_embed"}
    for key, tensor in back.items():
        assert torch.equal(tensor, state[key]), key
    # the per-block embedder copies are all the one original embedder
    sd = model.transformer.state_dict()
    for i in range(TINY["num_layers"]):
        assert torch.equal(sd[f"transformer_blocks.{i}.norm1.emb.timestep_embedder.linear_1.weight"],
                           state["t_embedder.mlp.0.weight"])
    x, t, y = inputs(TINY)
    with torch.no_grad():
        ours = model(x, t, y)
    assert rel_err(ours, oracle(TINY, state)(x, t, y)) < 1e-4


def test_training_checkpoint_wrapper_uses_ema(tmp_path):
    ema, raw = original_state(TINY, seed=4), original_state(TINY, seed=5)
    path = save_pt({"model": raw, "ema": ema}, tmp_path / "0001000.pt")
    model = load_dit("dit_tiny", TINY, weights=str(path))
    back = to_original(model.transformer.state_dict(), TINY["num_layers"])
    assert torch.equal(back["blocks.0.attn.qkv.weight"], ema["blocks.0.attn.qkv.weight"])


def test_diffusers_folder_round_trip(tmp_path):
    state = original_state(TINY, seed=6)
    model = load_dit("dit_tiny", TINY, weights=str(save_pt(state, tmp_path / "w.pt")))
    folder = tmp_path / "dit_folder"
    model.transformer.save_pretrained(folder)
    again = load_dit("dit_tiny", TINY, weights=str(folder), seed=123)  # another random init, then overwritten
    a, b = model.transformer.state_dict(), again.transformer.state_dict()
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # the diffusers layout also loads as a single safetensors file
    single = load_dit("dit_tiny", TINY, weights=str(folder / "diffusion_pytorch_model.safetensors"))
    x, t, y = inputs(TINY)
    with torch.no_grad():
        out_a, out_b, out_c = model(x, t, y), again(x, t, y), single(x, t, y)
    assert torch.equal(out_a, out_b) and torch.equal(out_a, out_c)


def test_pipeline_folder_with_torch_weights(tmp_path):
    """Older diffusers folders hold diffusion_pytorch_model.bin (a torch.save'd state dict): read weights-only."""
    state = original_state(TINY, seed=9)
    model = load_dit("dit_tiny", TINY, weights=str(save_pt(state, tmp_path / "w.pt")))
    folder = tmp_path / "pipeline" / "transformer"
    folder.mkdir(parents=True)
    torch.save(model.transformer.state_dict(), folder / "diffusion_pytorch_model.bin")
    again = load_dit("dit_tiny", TINY, weights=str(tmp_path / "pipeline"), seed=123)
    x, t, y = inputs(TINY)
    with torch.no_grad():
        assert torch.equal(model(x, t, y), again(x, t, y))


# --- (c) classifier-free guidance --------------------------------------------------------------------------
def test_guided_output_matches_original_forward_with_cfg(tmp_path):
    state = original_state(TINY, seed=7)
    model = load_dit("dit_tiny", TINY, weights=str(save_pt(state, tmp_path / "w.pt")), guided_channels=3)
    sampler = Sampler(DDIMScheduler(), steps=2, guidance_scale=1.5, batch_size=4)
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(2)
    x, _, y = inputs(TINY)
    y = y.clamp(max=TINY["num_embeds_ada_norm"] - 1)  # real labels; the null label is added by guidance
    seen = []
    for t in scheduler.timesteps:
        guided = sampler.guided_output(model, x, t, y, on_step=lambda *a: seen.append(a))
        t2 = torch.full((2 * len(x),), int(t))
        y2 = torch.cat([y, torch.full_like(y, model.null_label)])
        ref = oracle(TINY, state).forward_with_cfg(torch.cat([x, x]), t2, y2, 1.5)[: len(x)]
        assert guided.shape == ref.shape == (4, 8, 8, 8)
        assert rel_err(guided, ref) < 1e-4
        # the unguided channels (4th latent channel, variance) are the conditional prediction
        cond = oracle(TINY, state)(x, t2[: len(x)], y)
        assert rel_err(guided[:, 3:], cond[:, 3:]) < 1e-4
        assert rel_err(guided[:, :3], cond[:, :3]) > 1e-3
    assert len(seen) == 2 and all(len(a[0]) == 2 * len(x) for a in seen)
    assert torch.equal(seen[0][2], torch.cat([y, torch.full_like(y, model.null_label)]))


def test_sampler_runs_and_is_deterministic(tmp_path):
    state = original_state(TINY, seed=8)
    model = load_dit("dit_tiny", TINY, weights=str(save_pt(state, tmp_path / "w.pt")), guided_channels=3)
    sampler = Sampler(DDIMScheduler(), steps=2, guidance_scale=1.5, batch_size=4)
    labels = torch.arange(6) % TINY["num_embeds_ada_norm"]
    a = sampler.sample(model, labels, seed=0, progress=False, decode=False)
    b = sampler.sample(model, labels, seed=0, progress=False, decode=False)
    assert a.shape == (6, 4, 8, 8) and torch.isfinite(a).all() and torch.equal(a, b)


# --- (d) clear errors --------------------------------------------------------------------------------------
class NotATensor:
    def __init__(self):
        self.value = 1


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere" / "DiT.pt"
    with pytest.raises(UserError) as err:
        load_dit("dit_tiny", TINY, weights=str(path))
    assert_one_line_naming(err, path)


def test_missing_diffusers_weights_in_folder(tmp_path):
    folder = tmp_path / "empty_folder"
    folder.mkdir()
    with pytest.raises(UserError) as err:
        load_dit("dit_tiny", TINY, weights=str(folder))
    assert_one_line_naming(err, folder)


def test_truncated_pt(tmp_path):
    whole = save_pt(original_state(TINY), tmp_path / "whole.pt").read_bytes()
    path = tmp_path / "truncated.pt"
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(UserError) as err:
        load_dit("dit_tiny", TINY, weights=str(path))
    assert_one_line_naming(err, path)


def test_truncated_safetensors(tmp_path):
    model = load_dit("dit_tiny", TINY)
    model.transformer.save_pretrained(tmp_path / "folder")
    whole = (tmp_path / "folder" / "diffusion_pytorch_model.safetensors").read_bytes()
    path = tmp_path / "truncated.safetensors"
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(UserError) as err:
        load_dit("dit_tiny", TINY, weights=str(path))
    assert_one_line_naming(err, path)


@pytest.mark.parametrize("with_pos_embed", [True, False])
def test_wrong_hidden_size(tmp_path, with_pos_embed):
    other = {**TINY, "attention_head_dim": 48}  # hidden 96 instead of 64
    state = original_state(other)
    if not with_pos_embed:
        del state["pos_embed"]
    path = save_pt(state, tmp_path / "hidden96.pt")
    with pytest.raises(UserError) as err:
        load_dit("dit_tiny", TINY, weights=str(path))
    msg = assert_one_line_naming(err, path)
    assert "width 96" in msg and "width 64" in msg and "resolution" not in msg, msg


def test_wrong_depth(tmp_path):
    path = save_pt(original_state({**TINY, "num_layers": 3}), tmp_path / "deep.pt")
    with pytest.raises(UserError) as err:
        load_dit("dit_tiny", TINY, weights=str(path))
    assert_one_line_naming(err, path)


def test_pos_embed_for_another_input_size(tmp_path):
    # input 16 with patch 2: every weight has the right shape, only the fixed table tells the resolution apart
    state = original_state(TINY, input_size=16)
    path = save_pt(state, tmp_path / "DiT-256.pt")
    with pytest.raises(UserError) as err:
        load_dit("dit_tiny", TINY, weights=str(path))
    msg = assert_one_line_naming(err, path)
    assert "resolution" in msg


def test_pos_embed_with_other_values(tmp_path):
    state = original_state(TINY)
    state["pos_embed"] = state["pos_embed"].flip(1)  # right shape, wrong table
    path = save_pt(state, tmp_path / "flipped.pt")
    with pytest.raises(UserError) as err:
        load_dit("dit_tiny", TINY, weights=str(path))
    assert_one_line_naming(err, path)


@pytest.mark.parametrize("payload", ["namespace", "custom_class", "non_tensor_value", "list"])
def test_non_tensor_pickle(tmp_path, payload):
    state = original_state(TINY)
    obj = {
        "namespace": {"model": state, "ema": state, "args": argparse.Namespace(model="DiT-XL/2")},
        "custom_class": {**state, "extra": NotATensor()},
        "non_tensor_value": {**state, "step": 1000},
        "list": [state],
    }[payload]
    path = save_pt(obj, tmp_path / f"{payload}.pt")
    with pytest.raises(UserError) as err:
        read_state_dict(path)
    assert_one_line_naming(err, path)
    with pytest.raises(UserError):
        load_dit("dit_tiny", TINY, weights=str(path))


# --- loading memory ----------------------------------------------------------------------------------------
LOAD_PEAK = """
import json, sys, torch
from vq4dit.deploy.memory import peak_memory
from vq4dit.models import load_dit
arch = json.loads(sys.argv[2])
load = lambda: load_dit("big", arch, weights=sys.argv[1]).transformer  # noqa: E731
load()  # imports and first-use allocations out of the measurement
model, peak, _ = peak_memory(load)
params = list(model.parameters())
print(json.dumps([peak, sum(p.numel() * p.element_size() for p in params), len(params),
                  len({p.untyped_storage().data_ptr() for p in params})]))
"""


def test_loading_full_precision_weights_peaks_at_the_models_size(tmp_path):
    """A fresh process loads a 46 MB DiT from an original-layout file: the resident-set peak of the load is the
    model's parameter bytes plus a little (one copied tensor), not the twice that a randomly initialised model and
    the file's tensors take; and every parameter owns its storage (the fused qkv cut in three and the one embedder
    named in every block are copied apart)."""
    import json
    import os
    import subprocess

    from vq4dit.deploy.memory import CPU_PROBE_ENV

    arch = {**EPS_ONLY, "num_attention_heads": 6, "attention_head_dim": 64, "num_layers": 4}
    path = save_pt(original_state(arch), tmp_path / "DiT.pt")
    result = subprocess.run([sys.executable, "-c", LOAD_PEAK, str(path), json.dumps(arch)], capture_output=True,
                            text=True, env={**os.environ, **CPU_PROBE_ENV}, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    peak, model_bytes, params, storages = json.loads(result.stdout.strip().splitlines()[-1])
    assert model_bytes > 40 * 2**20
    assert peak < 1.2 * model_bytes, (peak, model_bytes)
    assert storages == params
