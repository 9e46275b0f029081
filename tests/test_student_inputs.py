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
