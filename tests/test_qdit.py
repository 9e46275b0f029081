"""Q-DiT: the scaled search space and budget in closed form, the evolutionary loop (improves, respects the budget,
resumes), and `train.py method=qdit` end to end on the tiny model (searched groups on weights and activations,
results reusable from their file)."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from vq4dit.cli.quantize import quantize
from vq4dit.errors import UserError
from vq4dit.quant.act_quantizer import input_quantizer_of
from vq4dit.quant.checkpoint import load_quantized
from vq4dit.search import candidate_score
from vq4dit.search.evolution import EvolutionSearch, SearchSettings
from vq4dit.search.group_sizes import GroupSizeSpace, scale_group_size

FAST = ["model=dit_tiny", "pool.trajectories=4", "pool.size=96", "pool.heldout_trajectories=2",
        "pool.heldout_size=32", "sampler.steps=6", "log_samples=0", "trainer.enable_progress_bar=false"]
SEARCH = ["method=qdit", "quant=w4a8", "method.search.samples=6", "method.search.generations=3",
          "method.search.population=5", "method.search.select=2", "method.search.mutations=2",
          "method.search.crossovers=1"]
SITE_LAYERS = {"qkv": ("attn1.to_q", "attn1.to_k", "attn1.to_v"), "proj": ("attn1.to_out.0",),
               "fc1": ("ff.net.0.proj",), "fc2": ("ff.net.2",)}


@pytest.mark.parametrize("hidden,space,base", [(1152, [32, 64, 128, 192, 288], 128), (256, [8, 16, 32, 64], 32),
                                               (64, [2, 4, 8, 16], 8)])
def test_the_papers_space_scales_to_divisors_of_the_width(hidden, space, base):
    scaled = sorted({scale_group_size(g, hidden, 1152) for g in (32, 64, 128, 192, 288)})
    assert scaled == space and scale_group_size(128, hidden, 1152) == base
    assert all(hidden % g == 0 and (4 * hidden) % g == 0 for g in scaled)


def _tiny_linears():
    h = 64
    shapes = {"attn1.to_q": (h, h), "attn1.to_k": (h, h), "attn1.to_v": (h, h), "attn1.to_out.0": (h, h),
              "ff.net.0.proj": (4 * h, h), "ff.net.2": (h, 4 * h), "norm1.linear": (6 * h, h)}
    return {name: torch.nn.Linear(i, o) for name, (o, i) in shapes.items()}


def _bitops(per_block, w_bits=4, a_bits=8):
    """Per token: out x in x (w_bits x a_bits + 256 / g) over q, k, v, proj, fc1, fc2 (tiny widths)."""
    layer_shapes = {"qkv": [(64, 64)] * 3, "proj": [(64, 64)], "fc1": [(256, 64)], "fc2": [(64, 256)]}
    return sum(o * i * (w_bits * a_bits + 256 / block[site]) for block in per_block
               for site, shapes in layer_shapes.items() for o, i in shapes)


def test_budgets_in_closed_form():
    space = GroupSizeSpace.of(_tiny_linears(), 2, [32, 64, 128, 192, 288], 128, 1152, "bitops", 4, 8)
    genome = (2, 16, 8, 4, 16, 16, 16, 8)
    assert space.cost(genome) == pytest.approx(_bitops(space.per_block(genome)))
    assert space.limit == pytest.approx(_bitops([{s: 8 for s in SITE_LAYERS}] * 2))
    assert not space.legal((2,) * 8) and space.legal((16,) * 8) and space.legal((8,) * 8)
    mean = GroupSizeSpace.of(_tiny_linears(), 2, [32, 64, 128, 192, 288], 128, 1152, "mean_group_size", 4, 8)
    assert mean.legal((4, 12, 8, 8, 8, 8, 8, 8)) and not mean.legal((4, 8, 8, 8, 8, 8, 8, 8))


def test_evolution_improves_respects_the_budget_and_resumes(tmp_path):
    target = (4, 16, 2, 8, 16, 4)  # a toy loss with its optimum over the budget
    loss = lambda g: sum(abs(math.log2(a) - math.log2(b)) for a, b in zip(g, target))  # noqa: E731
    legal = lambda g: sum(g) >= 8 * len(g)  # noqa: E731  (mean group size >= 8)
    settings = SearchSettings(generations=6, population=8, select=3, mutations=3, crossovers=2, mutation_prob=0.3)
    make = lambda path: EvolutionSearch(settings, (2, 4, 8, 16), 6, legal, (8,) * 6, seed=3, state_path=path)  # noqa
    whole = make(tmp_path / "a.json").run(loss, progress=False)
    assert whole["loss"] < whole["start_loss"] and legal(whole["best"])
    assert whole["history"] == sorted(whole["history"], reverse=True)  # elitism: the best never gets worse

    calls = []

    def crash_after_12(genome):
        if len(calls) == 12:
            raise KeyboardInterrupt
        calls.append(genome)
        return loss(genome)

    with pytest.raises(KeyboardInterrupt):
        make(tmp_path / "b.json").run(crash_after_12, progress=False)
    rescored = []
    resumed = make(tmp_path / "b.json").run(lambda g: rescored.append(g) or loss(g), progress=False)
    assert resumed == whole and not set(rescored) & set(calls)  # same result, nothing scored twice


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    from hydra import compose, initialize_config_dir

    from tests.conftest import ROOT

    tmp = tmp_path_factory.mktemp("qdit")
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.output_dir={tmp / 'run'}", f"paths.log_dir={tmp / 'logs'}",
                                          *FAST, *SEARCH])
    return cfg, quantize(cfg), tmp


def test_search_improves_on_its_start_within_the_budget(searched):
    cfg, ckpt, _ = searched
    result = json.loads((ckpt.parent / "qdit_group_sizes.json").read_text())
    assert result["loss"] < result["start_loss"]  # minus PSNR: the searched candidate is closer to fp
    assert result["space"] == [2, 4, 8, 16] and result["base"] == 8
    assert _bitops(result["group_sizes"]) <= _bitops([{s: 8 for s in SITE_LAYERS}] * 2)
    assert len(result["history"]) == 3 and result["history"][-1] == result["loss"]


def test_searched_sizes_group_the_weights_and_the_activations(searched):
    cfg, ckpt, _ = searched
    genes = json.loads((ckpt.parent / "qdit_group_sizes.json").read_text())["group_sizes"]
    model = load_quantized(ckpt, cfg.model)
    for block, groups in zip(model.blocks, genes):
        for site, names in SITE_LAYERS.items():
            for name in names:
                layer = block.get_submodule(name)
                quantizer = input_quantizer_of(layer)
                assert layer.group_size == groups[site] and layer.scale.shape[1] == layer.in_features // groups[site]
                assert quantizer.dynamic and quantizer.granularity == "token_group"
                assert quantizer.group_size == groups[site] and quantizer.bits == 8
        assert block.norm1.linear.group_size == 8 and input_quantizer_of(block.norm1.linear) is None


def test_a_saved_search_is_reused_and_a_rerun_resumes_it(searched, compose_cfg, tmp_path, monkeypatch):
    cfg, ckpt, tmp = searched
    scored = []
    original = candidate_score.CandidateScore.__call__
    monkeypatch.setattr(candidate_score.CandidateScore, "__call__",
                        lambda self, m: scored.append(1) or original(self, m))
    rerun = quantize(compose_cfg("train", *FAST, *SEARCH, f"paths.log_dir={tmp / 'logs'}"))  # same cache key
    assert not scored  # every candidate's score came from the saved state
    reused = quantize(compose_cfg("train", *FAST, *SEARCH,
                                  f"method.group_sizes={ckpt.parent / 'qdit_group_sizes.json'}",
                                  f"paths.output_dir={tmp_path / 'reused'}"))
    assert not scored
    first = load_file(ckpt / "model.safetensors")
    for other in (rerun, reused):
        again = load_file(other / "model.safetensors")
        assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)


@pytest.mark.parametrize("overrides,message", [
    (["quant=w4g64"], "quant=w4g64 fixes group size 64; method=qdit chooses group sizes per layer"),
    (["act.group_size=8"], "act.group_size=8 with method=qdit"),
    (["method.budget=flops"], "method.budget=flops; valid: bitops, mean_group_size"),
    (["method.search.select=9"], "select=9 .* exceed population=5"),
    (["method.search.score=lpips"], "method.search.score=lpips; valid: psnr, fid, hidden_mse"),
    (["act.dynamic=false"], "act.dynamic=false with method=qdit"),
])
def test_bad_qdit_settings_stop_before_any_work(compose_cfg, tmp_path, overrides, message):
    with pytest.raises(UserError, match=message) as err:
        quantize(compose_cfg("train", *FAST, *SEARCH, *overrides))
    assert "\n" not in str(err.value) and not (tmp_path / "logs" / "train" / "cache").exists()


def test_group_sizes_of_another_model_are_refused(compose_cfg, tmp_path):
    path = tmp_path / "digits.json"
    path.write_text(json.dumps({"format": "qdit-group-sizes", "model": "dit_digits", "hidden": 256, "blocks": 6,
                                "group_sizes": [{"qkv": 32, "proj": 32, "fc1": 32, "fc2": 32}] * 6}))
    with pytest.raises(UserError, match="holds group sizes for dit_digits .hidden 256, 6 blocks., not for this model"):
        quantize(compose_cfg("train", *FAST, *SEARCH, f"method.group_sizes={path}"))
    assert not (tmp_path / "logs" / "train" / "cache").exists()
