"""What a block's student sees: `pool.student_inputs`, or when null the method's choice (VQ4DiT: its quantized
predecessor's outputs, measured better end to end), fp wherever blocks run on several devices at once."""

import pytest

from vq4dit.calibration.pipeline import resolve_student_inputs
from vq4dit.errors import UserError
from vq4dit.methods import GPTQ, VQ4DiT
from vq4dit.quant.presets import UniformPreset, VQPreset


def test_null_is_the_methods_choice_and_an_explicit_value_wins():
    vq4dit, gptq = VQ4DiT(VQPreset(k=16, d=2)), GPTQ(UniformPreset(bits=4))
    assert resolve_student_inputs(None, vq4dit) == "quantized"
    assert resolve_student_inputs(None, gptq) == "fp"
    assert resolve_student_inputs(None, vq4dit, devices=2) == "fp"  # independent blocks, side by side
    assert resolve_student_inputs("fp", vq4dit) == "fp"
    assert resolve_student_inputs("quantized", gptq) == "quantized"
    with pytest.raises(UserError, match="pool.student_inputs=both; valid: fp, quantized"):
        resolve_student_inputs("both", gptq)


def test_quantized_inputs_are_the_quantized_predecessors_outputs(compose_cfg):
    """Block 0 sees the pool either way; block 1 then sees block 0's quantized outputs, so its error against the fp
    targets includes block 0's, and so do its input moments (data-aware k-means): equal to a pass of the model's
    first two blocks computed here, after quantization."""
    import copy

    import torch

    from vq4dit.calibration.pipeline import quantize_model
    from vq4dit.calibration.zero_data import ZeroDataBlockInputs
    from vq4dit.errors import instantiate
    from vq4dit.methods import KMeansVQ

    cfg = compose_cfg("train", "model=dit_tiny", "sampler.steps=5")
    fp = instantiate(cfg.model)
    stats = {}
    for inputs in ("fp", "quantized"):
        model = copy.deepcopy(fp)
        pool = ZeroDataBlockInputs(model, instantiate(cfg.sampler), 4, 40, seed=0, heldout_trajectories=2,
                                   heldout_size=16, progress=False)
        hidden = pool.hidden.clone()
        method = KMeansVQ(VQPreset(k=16, d=2), kmeans_weighting="input_moment", moment_damp=0.0, kmeans_iters=5)
        stats[inputs] = quantize_model(model, method, pool, student_inputs=inputs, progress=False).blocks
        if inputs == "quantized":  # block 1's heldout error, recomputed from block 0's quantized outputs
            t, y = pool.timesteps[pool.heldout_rows], pool.labels[pool.heldout_rows]
            with torch.no_grad():
                h = hidden[pool.heldout_rows]
                mid = model.blocks[0](h, timestep=t, class_labels=y)
                target = fp.blocks[1](fp.blocks[0](h, timestep=t, class_labels=y), timestep=t, class_labels=y)
                error = (model.blocks[1](mid, timestep=t, class_labels=y) - target).square().mean().item()
            assert error == pytest.approx(stats[inputs][1]["shipped_mse"], rel=1e-4)
    assert stats["fp"][0]["start_mse"] == pytest.approx(stats["quantized"][0]["start_mse"], rel=1e-6)
    assert stats["quantized"][1]["start_mse"] > stats["fp"][1]["start_mse"]


def test_gptq_takes_its_hessians_on_the_quantized_path(compose_cfg):
    """With quantized student inputs, block 1's Hessians are those of the inputs its layers see behind the quantized
    block 0 (as GPTQ's and Q-DiT's authors take them): H = 2/N X^T X from hooks of the test's own on the fp block 1
    run on block 0's quantized outputs of the training rows, and not the fp path's."""
    import copy

    import torch

    from vq4dit.calibration.pipeline import quantize_model
    from vq4dit.calibration.zero_data import ZeroDataBlockInputs
    from vq4dit.errors import instantiate
    from vq4dit.quant.block_layers import block_linears

    seen = []

    class RecordingGPTQ(GPTQ):
        def quantize(self, linear, hessian, group_size="preset"):
            seen.append((linear, hessian.clone()))
            return super().quantize(linear, hessian, group_size)

    cfg = compose_cfg("train", "model=dit_tiny", "sampler.steps=5")
    fp = instantiate(cfg.model)
    model = copy.deepcopy(fp)
    pool = ZeroDataBlockInputs(model, instantiate(cfg.sampler), 4, 40, seed=0, heldout_trajectories=2,
                               heldout_size=16, progress=False)
    linears = block_linears(model.blocks[1])  # the fp layers block 1 hands to GPTQ
    quantize_model(model, RecordingGPTQ(UniformPreset(bits=3)), pool, student_inputs="quantized", progress=False)
    recorded = {name: next(h for layer, h in seen if layer is linear) for name, linear in linears.items()}
    x, t, y = (r[pool.train_rows] for r in (pool.hidden, pool.timesteps, pool.labels))

    def hessians(block_0: torch.nn.Module) -> dict[str, torch.Tensor]:
        inputs = {}
        hooks = [fp.blocks[1].get_submodule(name).register_forward_pre_hook(
            lambda _, args, name=name: inputs.__setitem__(name, args[0].reshape(-1, args[0].shape[-1]).double()))
            for name in linears]
        with torch.no_grad():
            fp.blocks[1](block_0(x, timestep=t, class_labels=y), timestep=t, class_labels=y)
        for hook in hooks:
            hook.remove()
        return {name: 2 / len(v) * v.T @ v for name, v in inputs.items()}

    quantized, full_precision = hessians(model.blocks[0]), hessians(fp.blocks[0])
    for name, h in recorded.items():
        torch.testing.assert_close(h.double(), quantized[name], rtol=1e-4, atol=1e-6 * quantized[name].abs().max())
        if name != "norm1.linear":  # adaLN's input is the conditioning embedding, the same on both paths
            assert not torch.allclose(h.double(), full_precision[name], rtol=1e-3), name
