"""`train.py`'s job end to end on the tiny model, for every method: checkpoint format, reload in a fresh process,
resume, keep-the-better rule, bad input."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from vq4dit.calibration import block_calibration
from vq4dit.cli.quantize import quantize
from vq4dit.errors import UserError
from vq4dit.quant.checkpoint import load_quantized, quantized_layers
from vq4dit.quant.uniform_linear import UniformLinear
from vq4dit.quant.vq_linear import VQLinear

ROOT = Path(__file__).resolve().parents[1]
FAST = ["model=dit_tiny", "fit.iterations=12", "pool.trajectories=4", "pool.size=96",
        "pool.heldout_trajectories=2", "pool.heldout_size=32", "sampler.steps=6", "log_samples=0",
        "trainer.enable_progress_bar=false"]
SMALL_VQ = ["quant.k=16", "quant.d=2"]
SETTINGS = {  # method -> overrides (the tiny model's widths are 64 and 256: group 32 divides both)
    "rtn": ["method=rtn", "quant=w3g64", "quant.group_size=32"],
    "gptq": ["method=gptq", "quant=w3g64", "quant.group_size=32"],  # act-order's dynamic groups: group-indexed
    "kmeans": ["method=kmeans", "quant=w3", *SMALL_VQ],
    "classic_vq": ["method=classic_vq", "quant=w3", *SMALL_VQ],
    "vq4dit": ["method=vq4dit", "quant=w3", "quant.k=64"],  # 6-bit codes: packing across byte boundaries
}
FAMILY = {"rtn": "uniform", "gptq": "uniform", "kmeans": "vq", "classic_vq": "vq", "vq4dit": "vq"}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """One checkpoint per method on the tiny model, and the in-memory model each run produced."""
    from hydra import compose, initialize_config_dir

    from vq4dit.calibration.pipeline import quantize_model

    made, out = {}, {}

    def keep(*args, **kwargs):
        result = quantize_model(*args, **kwargs)
        made["model"] = copy.deepcopy(result.model)
        return result

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("vq4dit.cli.quantize.quantize_model", keep)
        for method in SETTINGS:
            tmp = tmp_path_factory.mktemp(method)
            with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
                cfg = compose("train", overrides=[f"paths.output_dir={tmp / 'run'}", f"paths.log_dir={tmp / 'logs'}",
                                                  *FAST, *SETTINGS[method]])
            out[method] = (cfg, quantize(cfg), made.pop("model"))
    return out


@pytest.mark.parametrize("method", list(SETTINGS))
def test_manifest_records_layer_types_and_sizes_equal_the_file(checkpoints, method):
    cfg, ckpt, _ = checkpoints[method]
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["method"]["name"] == method and manifest["method"]["quant"]["family"] == FAMILY[method]
    layers = manifest["layers"]
    assert len(layers) == 7 * cfg.model.arch.num_layers  # q, k, v, proj, fc1, fc2, adaLN per block
    expected_type = FAMILY[method]  # the deployed layer type of each family
    assert {r["type"] for r in layers.values()} == {expected_type}
    with safe_open(ckpt / "model.safetensors", "pt") as f:
        sizes = {key: f.get_slice(key).get_shape() for key in f.keys()}
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    nbytes = lambda keys: sum(tensors[k].numel() * tensors[k].element_size() for k in keys)  # noqa: E731
    assert manifest["sizes"]["model_bytes"] == nbytes(tensors)
    quantized = [k for k in tensors if k.rpartition(".")[0] in layers]
    assert manifest["sizes"]["blocks_bytes"] == nbytes(quantized)
    for name, record in layers.items():
        out_f, in_f = record["shape"]
        if expected_type == "vq":
            bits = record["code_bits"]
            assert sizes[f"{name}.codes_packed"] == [-(-record["num_codes"] * bits // 8)]
            assert tensors[f"{name}.codebook"].dtype == torch.float16
            expected_bits = (len(tensors[f"{name}.codes_packed"]) + 2 * tensors[f"{name}.codebook"].numel()) * 8
        else:
            bits, groups = record["bits"], record["groups"]
            assert sizes[f"{name}.codes_packed"] == [-(-out_f * in_f * bits // 8)]
            assert tensors[f"{name}.scale"].dtype == torch.float16 and sizes[f"{name}.scale"] == [out_f, groups]
            zero_bytes = len(tensors[f"{name}.zero_packed"]) if f"{name}.zero_packed" in tensors else 0
            index = tensors.get(f"{name}.group_index_packed")  # a group per input column, at ceil(log2 groups) bits
            index_bytes = -(-in_f * max(1, (groups - 1).bit_length()) // 8) if index is not None else 0
            assert index is None or len(index) == index_bytes
            expected_bits = (len(tensors[f"{name}.codes_packed"]) + 2 * out_f * groups + zero_bytes + index_bytes) * 8
        assert record["bits_per_weight"] == pytest.approx(expected_bits / (out_f * in_f))
    assert [b["block"] for b in manifest["blocks"]] == list(range(cfg.model.arch.num_layers))


@pytest.mark.parametrize("method", list(SETTINGS))
def test_quantized_weights_take_only_allowed_values(checkpoints, method):
    cfg, ckpt, _ = checkpoints[method]
    model = load_quantized(ckpt, cfg.model)
    layers = quantized_layers(model)
    if method == "gptq":  # act-order with dynamic groups: some layers' groups are scattered over their inputs
        assert any(layer.group_index is not None for layer in layers.values())
    for _name, layer in layers.items():
        w = layer.dequantize()
        if isinstance(layer, VQLinear):  # every sub-vector is one of the k codewords
            codebook = layer.codebook.detach()
            subvectors = w.reshape(-1, layer.d)
            distance = torch.cdist(subvectors.double(), codebook.double()).min(dim=1).values
            assert distance.max() == 0 and len(codebook) == cfg.quant.k
            assert torch.equal(codebook, codebook.half().float())
        else:  # every (row, group) holds at most 2^bits levels, evenly spaced by its scale, 0 among them
            assert isinstance(layer, UniformLinear) and layer.codes.max() < 2 ** layer.bits
            width = layer.in_features if layer.group_size is None else layer.group_size
            if layer.group_index is not None:  # each group's columns side by side
                w = w[:, torch.argsort(layer.group_index, stable=True)]
            groups = w.reshape(layer.out_features, -1, width)
            scale = layer.scale[:, :, None]
            steps = groups / scale
            torch.testing.assert_close(steps, steps.round(), atol=1e-4, rtol=0)  # multiples of the scale
            levels = steps.round()
            assert ((levels.amax(2) - levels.amin(2)) <= 2 ** layer.bits - 1).all()


def test_reloaded_checkpoints_reproduce_the_in_memory_models_in_a_fresh_process(checkpoints, tmp_path):
    """Save -> load in a new interpreter (the manifest alone rebuilds the model) -> same outputs as the model the
    calibration left in memory."""
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([10, 500, 900]), torch.tensor([1, 2, 10])
    torch.save({"x": x, "t": t, "y": y}, tmp_path / "inputs.pt")
    script = (
        "import sys, torch\n"
        "from vq4dit.quant.checkpoint import load_quantized\n"
        f"inp = torch.load({str(tmp_path / 'inputs.pt')!r}, weights_only=True)\n"
        "outs = {}\n"
        "for name, path in zip(sys.argv[1::2], sys.argv[2::2]):\n"
        "    model = load_quantized(path)\n"
        "    with torch.no_grad():\n"
        "        outs[name] = model(inp['x'], inp['t'], inp['y'])\n"
        f"torch.save(outs, {str(tmp_path / 'outputs.pt')!r})\n"
    )
    args = [a for method, (_, ckpt, _) in checkpoints.items() for a in (method, str(ckpt))]
    result = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    reloaded = torch.load(tmp_path / "outputs.pt", weights_only=True)
    for method, (_, _, in_memory) in checkpoints.items():
        with torch.no_grad():
            expected = in_memory(x, t, y)
        assert torch.equal(reloaded[method], expected), method


def test_a_fitted_block_is_kept_only_when_it_beats_its_start(checkpoints):
    for method in ("classic_vq", "vq4dit"):
        blocks = json.loads((checkpoints[method][1] / "manifest.json").read_text())["blocks"]
        for b in blocks:
            assert b["shipped_mse"] == min(b["method_mse"], b["start_mse"])
            assert b["kept"] == ("method" if b["method_mse"] <= b["start_mse"] else "start")


def test_a_calibration_worse_than_its_start_ships_the_start(compose_cfg, tmp_path):
    """VQ4DiT with an absurd ratio learning rate ends worse than k-means: every block ships the k-means start,
    the same tensors plain k-means writes with the same seed."""
    common = [*FAST, *SMALL_VQ, "quant=w3"]
    kmeans = quantize(compose_cfg("train", *common, "method=kmeans", f"paths.output_dir={tmp_path / 'k'}"))
    # the paper's k-means start (plain k-means' own), and no model-level fit after the blocks
    broken = quantize(compose_cfg("train", *common, "method=vq4dit", "method.lr_ratios=1000",
                                  "method.reg_weight=0", "method.kmeans_weighting=none", "model_fit=none",
                                  f"paths.output_dir={tmp_path / 'v'}"))
    blocks = json.loads((broken / "manifest.json").read_text())["blocks"]
    assert all(b["kept"] == "start" and b["method_mse"] > b["start_mse"] for b in blocks)
    a, b = load_file(kmeans / "model.safetensors"), load_file(broken / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_classic_vq_beats_its_kmeans_start_on_heldout_rows(compose_cfg):
    """End-to-end quality on the tiny model: fitting codebooks on the block loss lowers held-out block error."""
    cfg = compose_cfg("train", *FAST, "method=classic_vq", "quant=w3", "fit.iterations=300", "pool.trajectories=8",
                      "pool.size=256", "pool.heldout_trajectories=8", "pool.heldout_size=64", "sampler.steps=10")
    blocks = json.loads((quantize(cfg) / "manifest.json").read_text())["blocks"]
    for b in blocks:
        assert b["kept"] == "method" and b["method_mse"] < 0.9 * b["start_mse"], blocks


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_same_checkpoint(compose_cfg, tmp_path, monkeypatch, one_thread):
    """Bit-identical at one CPU thread, train.py's default (`threads`; README, "Reliability": two threads did not
    give the same bytes twice)."""
    fast = [*FAST, *SMALL_VQ]
    whole = quantize(compose_cfg("train", *fast, f"paths.log_dir={tmp_path / 'a'}",
                                 f"paths.output_dir={tmp_path / 'a/run'}"))

    class CrashError(Exception):
        pass

    original = block_calibration.BlockCalibration.training_step

    def crash_in_block_1(self, batch, batch_idx):
        if self.block_index == 1:
            raise CrashError()
        return original(self, batch, batch_idx)

    monkeypatch.setattr(block_calibration.BlockCalibration, "training_step", crash_in_block_1)
    b = [f"paths.log_dir={tmp_path / 'b'}"]
    with pytest.raises(CrashError):
        quantize(compose_cfg("train", *fast, *b, f"paths.output_dir={tmp_path / 'b/run1'}"))
    cached = sorted(p.name for p in (tmp_path / "b/train/cache").glob("*/block_*.safetensors"))
    assert cached == ["block_000.safetensors"]  # block 0 saved, block 1 not (no half block)
    monkeypatch.setattr(block_calibration.BlockCalibration, "training_step", original)
    resumed = quantize(compose_cfg("train", *fast, *b, f"paths.output_dir={tmp_path / 'b/run2'}"))
    first, second = load_file(whole / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key
    manifests = [json.loads((c / "manifest.json").read_text())["blocks"] for c in (whole, resumed)]
    assert manifests[0] == manifests[1]


@pytest.mark.parametrize("overrides,message", [
    (["quant.d=3"], "quant.d=3 does not divide"),
    (["quant.k=100000"], "quant.k=100000 is larger than"),
    (["method.candidates=0"], "method.candidates=0"),
    (["method.ratio_init=random"], "method.ratio_init=random; valid: uniform, inverse_distance"),
    (["method.harden_at=0"], "method.harden_at=0"),
    (["method=rtn", "quant=w2"], "quant=w2 is a vq preset .*method=rtn needs a uniform preset"),
    (["method=gptq", "quant=w3"], "quant=w3 is a vq preset .*method=gptq needs a uniform preset"),
    (["method=vq4dit", "quant=w4g64"], "quant=w4g64 is a uniform preset .*method=vq4dit needs a vq preset"),
    (["method=kmeans", "quant=w2pc"], "quant=w2pc is a uniform preset .*method=kmeans needs a vq preset"),
    (["method=rtn", "quant=w4g64", "quant.group_size=48"], "quant.group_size=48 does not divide"),
    (["method=rtn", "quant=w4g64", "quant.bits=9"], r"quant.bits=9; valid: an integer in \[2, 8\]"),
    (["method=gptq", "method.damp=-1"], "method.damp=-1"),
    (["fit.iterations=0"], "fit.iterations=0"),
    (["pool.size=0"], "pool.size=0"),
])
def test_bad_settings_stop_before_any_work(compose_cfg, tmp_path, overrides, message):
    cfg = compose_cfg("train", *FAST, *overrides)
    with pytest.raises(UserError, match=message) as err:
        quantize(cfg)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "logs" / "train" / "cache").exists() and not (tmp_path / "run" / "checkpoint").exists()


def test_checkpoint_of_another_model_is_refused(compose_cfg, checkpoints):
    _, ckpt, _ = checkpoints["kmeans"]
    other = compose_cfg("eval", "model=dit_digits", f"ckpt={ckpt}")
    with pytest.raises(UserError, match="quantized dit_tiny, not model=dit_digits"):
        load_quantized(Path(ckpt), other.model)


def test_fp_weights_of_another_model_are_refused(compose_cfg, tmp_path):
    from hydra.utils import instantiate

    digits = compose_cfg("eval", "model=dit_digits", "model.weights=null", "ckpt=x")
    instantiate(digits.model).transformer.save_pretrained(tmp_path / "digits")
    cfg = compose_cfg("train", *FAST, *SMALL_VQ, f"model.weights={tmp_path / 'digits'}")
    with pytest.raises(UserError, match="holds a DiT of depth 6, width 256, patch 4; model=dit_tiny has depth 2, "
                                        "width 64, patch 2"):
        quantize(cfg)


def test_vq_layers_hold_codes_in_the_smallest_dtype(compose_cfg):
    cfg = compose_cfg("train", *FAST, "quant.k=512", "quant.d=4", "method=kmeans")
    model = load_quantized(quantize(cfg), cfg.model)
    layer = next(iter(quantized_layers(model).values()))
    assert isinstance(layer, VQLinear) and layer.codes.dtype == torch.int16 and layer.k == 512


@pytest.mark.parametrize("method,presets", [("rtn", ["w2g64", "w3g64", "w4g64"]), ("gptq", ["w2pc", "w3pc", "w4pc"]),
                                            ("kmeans", ["w2", "w3", "w4"])])
def test_block_error_falls_as_bits_rise(compose_cfg, tmp_path, method, presets):
    errors = []
    for preset in presets:
        cfg = compose_cfg("train", *FAST, f"method={method}", f"quant={preset}",
                          f"paths.output_dir={tmp_path / preset}")
        if preset.endswith("g64"):
            cfg.quant.group_size = 32  # divides the tiny model's widths (64 and 256)
        blocks = json.loads((quantize(cfg) / "manifest.json").read_text())["blocks"]
        errors.append(sum(b["shipped_mse"] for b in blocks) / len(blocks))
    assert errors[0] > 2 * errors[1] > 4 * errors[2], errors


def test_gptq_beats_rtn_on_heldout_rows(compose_cfg, tmp_path):
    shipped = {}
    for method in ("rtn", "gptq"):
        cfg = compose_cfg("train", *FAST, f"method={method}", "quant=w3pc", f"paths.output_dir={tmp_path / method}")
        shipped[method] = json.loads((quantize(cfg) / "manifest.json").read_text())["blocks"]
    for rtn, gptq in zip(shipped["rtn"], shipped["gptq"]):
        assert gptq["start_mse"] == rtn["shipped_mse"]  # GPTQ's start is RTN
        assert gptq["kept"] == "method" and gptq["method_mse"] < rtn["shipped_mse"]
