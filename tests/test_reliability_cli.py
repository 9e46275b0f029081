"""Bad input through the real command lines (`python train.py`, `python eval.py`): every case ends with exit
status 2 and one `error:` line that names the bad value, before any heavy work, and leaves no run folder behind
(a refused rerun into an existing run folder leaves that folder's record untouched)."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vq4dit.models.dit import build_transformer
from vq4dit.quant.checkpoint import DIGESTS, TensorFile, tensor_digests

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model=dit_tiny", "fit.iterations=4", "pool.trajectories=2", "pool.size=32", "pool.heldout_trajectories=1",
        "pool.heldout_size=8", "sampler.steps=2", "log_samples=0", "trainer.enable_progress_bar=false"]
TINY_ARCH = {"num_attention_heads": 2, "attention_head_dim": 32, "in_channels": 4, "out_channels": 8,
             "num_layers": 2, "sample_size": 8, "patch_size": 2, "num_embeds_ada_norm": 10, "norm_eps": 1e-6}


def cli(script: str, *args: str, logs: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PROJECT_ROOT": str(ROOT), "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, script, *args, f"paths.log_dir={logs}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def assert_refused(result: subprocess.CompletedProcess, *named: str) -> str:
    """Exit 2, exactly one line on stderr, `error: ...` naming every string in `named`, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    assert "Traceback" not in result.stderr + result.stdout
    for text in named:
        assert text in lines[0], (text, lines[0])
    return lines[0]


def no_run_folder(logs: Path) -> None:
    runs = [p for p in logs.glob("*/runs/*")] if logs.exists() else []
    assert not runs, f"a refused run left {runs}"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Payloads: fp weights with a NaN and an Inf, a file where a folder is expected."""
    tmp = tmp_path_factory.mktemp("payloads")
    out = {}
    for bad, value in (("nan", float("nan")), ("inf", float("inf"))):
        transformer = build_transformer(TINY_ARCH, seed=0)
        with torch.no_grad():
            transformer.transformer_blocks[1].ff.net[2].weight[3, 5] = value
        transformer.save_pretrained(tmp / bad)
        out[bad] = tmp / bad
    (tmp / "a_file").write_text("not a folder")
    out["file"] = tmp / "a_file"
    return out


def slow(*case):
    """A further member of a class that a fast case already covers: run with -m slow."""
    return pytest.param(*case, marks=pytest.mark.slow)


TRAIN_CASES = [  # (overrides, strings the line must name): each stands for a class of bad input
    (["seed=abc"], ["seed=abc", "integer"]),                                   # type
    slow(["seed=1.5"], ["seed=1.5", "integer"]),
    slow(["device=banana"], ["device=banana", "valid"]),                           # device name
    (["device=cuda:7"], ["device=cuda:7", "not available on this machine"]),   # a device this machine lacks
    slow(["devices=0"], ["devices=0"]),
    slow(["precision=fp8"], ["precision=fp8", "fp32, bf16, fp16"]),            # choice
    slow(["sampler.steps=0"], ["sampler.steps=0", ">= 1"]),                    # ranges
    (["sampler.guidance_scale=-1"], ["sampler.guidance_scale=-1", ">= 1"]),
    slow(["sampler.batch_size=0"], ["sampler.batch_size=0"]),
    slow(["fit.batch_size=0"], ["fit.batch_size=0"]),
    slow(["fit.iterations=-5"], ["fit.iterations=-5"]),
    slow(["fit.lr=-1"], ["fit.lr=-1", "> 0"]),
    slow(["pool.size=0"], ["pool.size=0"]),
    slow(["pool.trajectories=0"], ["pool.trajectories=0"]),
    slow(["pool.student_inputs=both"], ["pool.student_inputs=both", "fp, quantized"]),
    slow(["method.freeze_threshold=5"], ["method.freeze_threshold=5", "(0, 1]"]),
    slow(["method.lr_ratios=-1"], ["method.lr_ratios=-1", "> 0"]),
    slow(["method.candidates=abc"], ["method.candidates=abc", "integer"]),
    (["method.iterations=-5"], ["method.iterations=-5", "no setting iterations", "candidates"]),  # unknown key
    slow(["+foo=1"], ["foo=1", "not a setting"]),
    slow(["model.arch.num_layers=[1"], ["model.arch.num_layers=[1", "not a valid override"]),  # grammar
    slow(["method=kmeans", "method.kmeans_iters=0"], ["method.kmeans_iters=0"]),
    (["quant=w5"], ["quant/w5", "w3"]),                                        # unknown option
    slow(["quant.k=1"], ["quant.k=1", ">= 2"]),
    slow(["quant.d=0"], ["quant.d=0"]),
    (["method=rtn", "quant=w2"], ["quant=w2 is a vq preset", "method=rtn needs a uniform preset"]),  # relations
    slow(["quant.d=3"], ["quant.d=3 does not divide"]),
    slow(["quant.k=100000"], ["quant.k=100000 is larger than"]),
    (["model.weights=/nonexistent/dit"], ["model.weights=/nonexistent/dit", "does not exist"]),   # paths
    (["model=dit_xl_2"], ["model.weights is not set"]),                         # required, before building XL
    slow(["model=dit_xl_2", "model.weights=/nonexistent.pt", "model.vae=/nonexistent"], ["/nonexistent"]),
    slow(["estimate.tflops=0"], ["estimate.tflops=0"]),
    slow(["threads=0"], ["threads=0"]),
]


def _ids(cases) -> list[str]:
    return [" ".join((c.values if hasattr(c, "values") else c)[0]) or "no ckpt" for c in cases]


@pytest.mark.parametrize("overrides,named", TRAIN_CASES, ids=_ids(TRAIN_CASES))
def test_train_refuses_bad_input_in_one_line(tmp_path, overrides, named):
    start = time.time()
    assert_refused(cli("train.py", *TINY, *overrides, logs=tmp_path / "logs"), *named)
    assert time.time() - start < 60  # no heavy work first (a random DiT-XL/2 alone takes 20 s and 3.4 GB)
    no_run_folder(tmp_path / "logs")
    assert not (tmp_path / "logs" / "train" / "cache").exists()


@pytest.mark.parametrize("bad", [pytest.param("nan", marks=pytest.mark.slow), "inf"])
def test_non_finite_weights_are_refused_at_load_naming_the_tensor(tmp_path, files, bad):
    line = assert_refused(cli("train.py", *TINY, "method=rtn", f"model.weights={files[bad]}", logs=tmp_path / "logs"),
                          "transformer_blocks.1.ff.net.2.weight", "NaN/Inf")
    assert str(files[bad]) in line
    no_run_folder(tmp_path / "logs")


def test_weights_of_another_dit_size_say_what_was_found_and_expected(tmp_path):
    assert_refused(cli("train.py", *TINY, f"model.weights={ROOT / 'data/dit_digits'}", logs=tmp_path / "logs"),
                   "depth 6, width 256, patch 4", "model=dit_tiny has depth 2, width 64, patch 2")


def test_unwritable_output_folder_is_refused_before_any_work(tmp_path, files):
    assert_refused(cli("train.py", *TINY, logs=files["file"] / "logs"), "cannot be written", str(files["file"]))
    assert files["file"].read_text() == "not a folder"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished train.py run folder (a k-means checkpoint of the tiny DiT)."""
    logs = tmp_path_factory.mktemp("finished") / "logs"
    result = cli("train.py", *TINY, "method=kmeans", "quant.k=16", "quant.d=2", logs=logs)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = list((logs / "train" / "runs").iterdir())
    return run


def test_a_refused_rerun_leaves_the_existing_run_folder_as_it_was(finished_run, tmp_path):
    before = {p: p.read_bytes() for p in finished_run.rglob("*") if p.is_file()}
    assert_refused(cli("train.py", *TINY, "method=kmeans", "quant.k=16", "quant.d=2", f"hydra.run.dir={finished_run}",
                       logs=tmp_path / "logs"), str(finished_run / "checkpoint"), "already exists")
    after = {p: p.read_bytes() for p in finished_run.rglob("*") if p.is_file()}
    assert after == before  # .hydra/config.yaml included: the record still describes the results beside it


@pytest.mark.slow
def test_the_printed_eval_command_works_after_architecture_overrides(tmp_path):
    arch = ["model=dit_digits", "model.weights=null", "model.arch.num_layers=1", "model.arch.num_attention_heads=2"]
    result = cli("train.py", *arch, *TINY[1:], "method=rtn", "debug=fast", logs=tmp_path / "logs")
    assert result.returncode == 0, result.stderr[-3000:]
    (line,) = [x for x in result.stdout.splitlines() if x.startswith("score it:")]
    command = line.removeprefix("score it:").split()
    manifest = json.loads((Path(command[-1].removeprefix("ckpt=")) / "manifest.json").read_text())
    assert (manifest["debug"], manifest["threads"]) == ("fast", 1)  # a debug run says so in its record
    assert command[:2] == ["python", "eval.py"]
    scored = cli("eval.py", *command[2:], "num_samples=10", "sampler.steps=2", logs=tmp_path / "logs")
    assert scored.returncode == 0, scored.stderr[-3000:]
    assert "fid:" in scored.stdout


EVAL_CASES = [
    ([], ["ckpt is not set"]),
    (["ckpt=/nonexistent"], ["ckpt=/nonexistent"]),
    slow(["ckpt=data/dit_digits", "num_samples=0"], ["num_samples=0", ">= 2"]),
    slow(["ckpt=data/dit_digits", "num_samples=-5"], ["num_samples=-5"]),
    (["ckpt=data/dit_digits", "num_samples=1"], ["num_samples=1"]),
    slow(["ckpt=data/dit_digits", "grid_columns=0"], ["grid_columns=0"]),
    (["ckpt=data/dit_digits", "decode=fast"], ["decode=fast", "per_forward, once"]),
    slow(["ckpt=data/dit_digits", "compare_to=/nonexistent.npz"], ["compare_to=/nonexistent.npz"]),
    slow(["ckpt=data/dit_digits", "seed=abc"], ["seed=abc"]),
    slow(["ckpt=data/dit_digits", "device=cuda:7"], ["device=cuda:7"]),
    slow(["ckpt=data/dit_digits", "sampler.steps=0"], ["sampler.steps=0"]),
    slow(["ckpt=data/dit_digits", "metric.classifier=/nonexistent.safetensors"], ["metric.classifier=/nonexistent"]),
    slow(["model=dit_xl_2", "ckpt=/nonexistent.pt", "model.vae=/nonexistent"], ["/nonexistent"]),
    (["model=dit_xl_2", "ckpt=data/dit_digits"], ["model.vae is not set"]),
]


@pytest.mark.parametrize("overrides,named", EVAL_CASES, ids=_ids(EVAL_CASES))
def test_eval_refuses_bad_input_in_one_line(tmp_path, overrides, named):
    assert_refused(cli("eval.py", *overrides, logs=tmp_path / "logs"), *named)
    no_run_folder(tmp_path / "logs")


def test_a_model_the_metric_cannot_score_is_refused_before_sampling(tmp_path, files):
    tiny = build_transformer(TINY_ARCH, seed=0)
    tiny.save_pretrained(tmp_path / "tiny")
    assert_refused(cli("eval.py", "model=dit_tiny", f"ckpt={tmp_path / 'tiny'}", logs=tmp_path / "logs"),
                   "4 x 8 x 8")
    no_run_folder(tmp_path / "logs")


def test_eval_into_a_finished_eval_folder_leaves_it_as_it_was(tmp_path):
    run = tmp_path / "done"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("the record of the results beside it\n")
    (run / "metrics.json").write_text("{}\n")
    assert_refused(cli("eval.py", "ckpt=data/dit_digits", f"hydra.run.dir={run}", logs=tmp_path / "logs"),
                   str(run / "metrics.json"), "already exists")
    assert (run / ".hydra" / "config.yaml").read_text() == "the record of the results beside it\n"


def _tampered(finished_run: Path, tmp_path: Path, edit) -> Path:
    """A copy whose manifest and tensors went through `edit`, with the tensors' digests rewritten to match: the
    checks behind the digest (a writer that got its records wrong, not a damaged file)."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(finished_run / "checkpoint", ckpt)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    tensors = load_file(ckpt / "model.safetensors")
    edit(manifest, tensors)
    manifest[DIGESTS] = tensor_digests(tensors)
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    save_file(tensors, ckpt / "model.safetensors")
    return ckpt


LAYER = "transformer_blocks.0.attn1.to_q"


def _set_k(manifest, tensors):
    manifest["layers"][LAYER]["k"] = 8


def _codes_past_k(manifest, tensors):  # a 4-bit code 15 where k = 12 allows 0..11: garbage codes today
    manifest["layers"][LAYER]["k"] = 12
    tensors[f"{LAYER}.codebook"] = tensors[f"{LAYER}.codebook"][:12].clone()
    tensors[f"{LAYER}.codes_packed"][0] = 0xFF


def _nan_codebook(manifest, tensors):
    tensors[f"{LAYER}.codebook"][2, 1] = float("nan")


def _inf_full_precision(manifest, tensors):
    tensors["proj_out_2.weight"][0, 0] = float("inf")


def _unknown_type(manifest, tensors):
    manifest["layers"][LAYER]["type"] = "lut"


def _shape(manifest, tensors):
    manifest["layers"][LAYER]["shape"] = [32, 64]
    manifest["layers"][LAYER]["num_codes"] = 32 * 32


@pytest.mark.parametrize("edit,named", [
    slow(_set_k, [LAYER, "k=8"]),
    (_codes_past_k, [LAYER, "code 15", "0..11"]),
    (_nan_codebook, [LAYER, "codebook", "NaN/Inf"]),
    slow(_inf_full_precision, ["proj_out_2.weight", "NaN/Inf"]),
    slow(_unknown_type, [LAYER, "lut"]),
    slow(_shape, [LAYER]),
], ids=["k", "codes >= k", "nan codebook", "inf fp tensor", "layer type", "shape"])
def test_a_checkpoint_whose_manifest_and_tensors_disagree_is_refused(finished_run, tmp_path, edit, named):
    ckpt = _tampered(finished_run, tmp_path, edit)
    assert_refused(cli("eval.py", "model=dit_tiny", f"ckpt={ckpt}", logs=tmp_path / "logs"), *named)
    no_run_folder(tmp_path / "logs")


def flip_a_byte_of(ckpt: Path, tensor: str, file: str = "model.safetensors") -> None:
    """One bit of `tensor`'s data in the file flipped in place (the header, and so the file's layout, unchanged):
    what a bad disk or a bad copy does."""
    path = ckpt / file
    with TensorFile(path) as f:
        begin, end = f.header[tensor]["data_offsets"]
        start = f.start
    data = bytearray(path.read_bytes())
    data[start + (begin + end) // 2] ^= 0x04
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("script", ["eval.py", pytest.param("export.py", marks=pytest.mark.slow)])
def test_a_flipped_byte_of_a_code_tensor_is_refused_naming_it(finished_run, tmp_path, script):
    """Before the digest such a file loaded silently (a few codes of one layer pointing at other codewords)."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(finished_run / "checkpoint", ckpt)
    flip_a_byte_of(ckpt, f"{LAYER}.codes_packed")
    args = ["model=dit_tiny", f"ckpt={ckpt}"] + ([f"out={tmp_path / 'exported'}"] if script == "export.py" else [])
    assert_refused(cli(script, *args, logs=tmp_path / "logs"), f"{LAYER}.codes_packed", "sha256")
    no_run_folder(tmp_path / "logs")
    assert not (tmp_path / "exported").exists()
