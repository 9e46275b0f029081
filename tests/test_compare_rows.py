"""The comparison's rows (benchmarks/compare_rows.py) and which of their differences are real
(benchmarks/paired_bootstrap.py): a row's record is served only to the code that made it, reloaded from disk with its
per-sample data; any other record of it is stale, in one line naming what differs; per-sample data give back the
scorer's own FID, accuracy and PSNR; the paired bootstrap against closed forms and torchmetrics; and
`compare.py --from-cache` through the real command line."""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import compare_rows  # noqa: E402
import paired_bootstrap as pb  # noqa: E402
from compare_rows import Code, Records  # noqa: E402
from harness import config  # noqa: E402


def test_a_row_names_method_preset_activations_and_settings():
    assert compare_rows.overrides_for("gptq-w3g64") == ["method=gptq", "quant=w3g64"]
    assert compare_rows.overrides_for("vq4dit-w2-a8") == ["method=vq4dit", "quant=w2", "act=a8"]
    assert compare_rows.overrides_for("vq4dit-w3+candidates=3+pool.student_inputs=quantized") == [
        "method=vq4dit", "quant=w3", "method.candidates=3", "pool.student_inputs=quantized"]


# -- the code a record is keyed on ---------------------------------------------------------------------------------
@pytest.fixture
def tree(tmp_path):
    """A checkout-shaped folder holding a file of every kind CODE covers, and some it does not."""
    root = tmp_path / "checkout"
    files = {"src/vq4dit/methods/gptq.py": "act_order = False\n", "src/vq4dit/metrics.py": "x = 1\n",
             "configs/method/gptq.yaml": "damp: 0.01\n", "data/dit_digits/config.json": "{}\n",
             "benchmarks/compare_rows.py": "# makes rows\n",
             "docs/comparison.md": "notes\n", "benchmarks/compare.py": "# the table\n", "tests/test_x.py": "\n"}
    for path, text in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
    return root


def stored(records: Records, name: str, **row) -> dict:
    tensors = {"labels": torch.arange(6) % 3, "features": torch.randn(6, 4, generator=torch.Generator().manual_seed(0))}
    return records.store(name, {"row": name, "fid": 17.5, **row}, tensors)


def test_a_record_is_served_to_its_code_and_reloads_from_disk(tree, tmp_path):
    made = stored(Records(tmp_path / "records", Code(tree)), "rtn-w4pc-s0-key", settings={"seed": 0})
    again = Records(tmp_path / "records", Code(tree))  # a new process: everything from disk
    record = again.valid("rtn-w4pc-s0-key")
    assert record == made and record["fid"] == 17.5 and record["code"] == Code(tree).digest
    assert torch.equal(compare_rows.per_sample(record)["features"], compare_rows.per_sample(made)["features"])
    assert again.stale("rtn-w4pc-s0-key") is None
    assert not list((tmp_path / "records").rglob("*.tmp*"))  # written under temporary names, then renamed


def test_a_source_change_makes_the_record_stale_and_names_what_differs(tree, tmp_path):
    stored(Records(tmp_path / "records", Code(tree)), "gptq-w3g64-s0-key", settings={"method.act_order": False})
    for outside in ("docs/comparison.md", "benchmarks/compare.py", "tests/test_x.py"):  # not the row's code
        (tree / outside).write_text("changed\n")
    assert Records(tmp_path / "records", Code(tree)).valid("gptq-w3g64-s0-key") is not None
    (tree / "src/vq4dit/methods/gptq.py").write_text("act_order = True\n")
    (tree / "src/vq4dit/quant").mkdir()
    (tree / "src/vq4dit/quant/soft_mix.py").write_text("\n")
    today = Records(tmp_path / "records", Code(tree))
    assert today.valid("gptq-w3g64-s0-key") is None  # never served
    line = today.stale("gptq-w3g64-s0-key", {"method.act_order": True})
    assert "\n" not in line and line.startswith("stale: made ")
    assert "src/vq4dit/methods/gptq.py changed" in line and "src/vq4dit/quant/soft_mix.py added" in line
    assert "method.act_order (False -> True)" in line
    assert not any(name in line for name in ("metrics.py", "configs/", "docs/", "compare.py "))
    (tree / "src/vq4dit/methods/gptq.py").write_text("act_order = False\n")  # back: the old code again
    (tree / "src/vq4dit/quant/soft_mix.py").unlink()
    assert Records(tmp_path / "records", Code(tree)).valid("gptq-w3g64-s0-key") is not None


def test_every_kind_of_row_code_changes_the_digest(tree):
    digest = Code(tree).digest
    for path in ("configs/method/gptq.yaml", "data/dit_digits/config.json", "benchmarks/compare_rows.py",
                 "src/vq4dit/metrics.py"):
        before = (tree / path).read_text()
        (tree / path).write_text(before + "# edit\n")
        assert Code(tree).digest != digest, path
        (tree / path).write_text(before)
    assert Code(tree).digest == digest


def test_a_record_from_before_records_named_their_code_is_stale(tree, tmp_path):
    folder = tmp_path / "records" / "vq4dit-w2-s0-key-0123456789abcdef"
    folder.mkdir(parents=True)
    (folder / "row.json").write_text(json.dumps({"fid": 18.71, "made": "2026-11-24"}))
    line = Records(tmp_path / "records", Code(tree)).stale("vq4dit-w2-s0-key")
    assert line == "stale: made 2026-11-24, before records named their code"


def test_a_record_of_the_same_settings_under_another_name_is_served(tree, tmp_path):
    records = Records(tmp_path / "records", Code(tree))
    evaluation = {"num_samples": 6, "seed": 0, "sampler": {"steps": 100}}
    made = stored(records, "vq4dit-w3-s0-key", settings={"method.candidates": 3}, eval=evaluation)
    assert records.equivalent({"method.candidates": 3}, evaluation) == made
    assert records.equivalent({"method.candidates": 5}, evaluation) is None
    assert records.equivalent({"method.candidates": 3}, {**evaluation, "num_samples": 7}) is None


def test_settings_are_what_the_config_resolves_to(compose_cfg):
    """A method setting given at its default resolves like the default row; another value differs in that key
    alone; where the run writes is not a setting, and paths inside the checkout are relative to it."""
    base = compare_rows.row_settings(compose_cfg("train", "method=vq4dit", "quant=w3"))
    candidates = base["method.candidates"]
    spelled = compare_rows.row_settings(compose_cfg("train", "method=vq4dit", "quant=w3",
                                                    f"method.candidates={candidates}", "paths.output_dir=/elsewhere"))
    assert spelled == base
    other = compare_rows.row_settings(compose_cfg("train", "method=vq4dit", "quant=w3",
                                                  f"method.candidates={candidates + 1}"))
    assert {k for k in base if base[k] != other[k]} == {"method.candidates"}
    assert base["model.weights"] == "<root>/data/dit_digits" and not any("output_dir" in k for k in base)
    assert base["pool.student_inputs"] in ("fp", "quantized") and base["model_fit.iterations"] is not None


# -- the paired bootstrap ------------------------------------------------------------------------------------------
def synthetic_run(seed: int, n: int = 200, shift: float = 0.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"labels": torch.arange(n) % 10, "features": torch.randn(n, 8, generator=g) + shift,
            "correct": torch.rand(n, generator=g) < 0.9,
            "squared_error": torch.rand(n, generator=g, dtype=torch.float64)}


@pytest.fixture(scope="module")
def real() -> pb.RealSide:
    return pb.RealSide(torch.randn(300, 8, generator=torch.Generator().manual_seed(99)))


def test_identical_rows_differ_by_exactly_zero_and_are_not_marked(real):
    run = synthetic_run(0)
    indices = pb.resamples(200, 300)
    above = pb.row_statistics([pb.run_statistics(run, real, indices)])
    below = pb.row_statistics([pb.run_statistics({k: v.clone() for k, v in run.items()}, real, indices)])
    diff = pb.differences(above, below)
    assert diff == {key: (0.0, 0.0) for key in pb.METRICS}
    assert not any(pb.excludes_zero(interval) for interval in diff.values())


def test_a_constant_psnr_shift_gives_exactly_that_interval(real):
    """Every sample's error 10^(-s/10) times the other row's: its PSNR is s dB higher on every resample."""
    run = synthetic_run(1)
    better = {**run, "squared_error": run["squared_error"] * 10 ** (-1.5 / 10)}
    indices = pb.resamples(200, 300)
    diff = pb.differences(pb.row_statistics([pb.run_statistics(run, real, indices)]),
                          pb.row_statistics([pb.run_statistics(better, real, indices)]))
    assert diff["psnr_vs_reference"] == pytest.approx((1.5, 1.5), abs=1e-9)
    assert pb.excludes_zero(diff["psnr_vs_reference"])
    assert diff["fid"] == (0.0, 0.0) and diff["class_accuracy"] == (0.0, 0.0)


def test_fid_of_a_resample_equals_torchmetrics(real):
    """frechet() against torchmetrics' FrechetInceptionDistance fed the same (resampled) features."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    class Given(torch.nn.Module):
        num_features = 8

        def forward(self, x):
            return x

    real_features = torch.randn(300, 8, generator=torch.Generator().manual_seed(99))
    fake = torch.randn(120, 8, generator=torch.Generator().manual_seed(5)) * 1.3 + 0.4
    indices = torch.cat([torch.arange(120)[None], pb.resamples(120, 3, seed=7)])
    ours = pb.frechet(fake, real, indices)
    for row, value in zip(indices, ours):
        fid = FrechetInceptionDistance(feature=Given())
        fid.update(real_features.double(), real=True)
        fid.update(fake[row].double(), real=False)
        assert value.item() == pytest.approx(fid.compute().item(), rel=1e-6)


def test_the_bootstrap_pairs_the_samples(real):
    """Accuracy: the paired bootstrap's sd of a difference is the closed form sqrt(var(c_b - c_a) / n), far below the
    unpaired sqrt((var(c_a) + var(c_b)) / n) when the rows agree on most samples; its interval is centred on the
    difference."""
    n = 400
    a = synthetic_run(2, n)
    flips = torch.rand(n, generator=torch.Generator().manual_seed(3)) < 0.04
    b = {**a, "correct": a["correct"] ^ flips}
    indices = pb.resamples(n, 4000)
    sa, sb = (pb.row_statistics([pb.run_statistics(r, real, indices)]) for r in (a, b))
    resampled = sb["class_accuracy"] - sa["class_accuracy"]
    d = b["correct"].double() - a["correct"].double()
    paired = math.sqrt(d.var(unbiased=False).item() / n)
    unpaired = math.sqrt((a["correct"].double().var(unbiased=False) + b["correct"].double().var(unbiased=False)).item()
                         / n)
    assert resampled.std().item() == pytest.approx(paired, rel=0.1)
    assert paired < unpaired / 2
    low, high = pb.differences(sa, sb)["class_accuracy"]
    assert low < d.mean().item() < high


def test_a_row_is_the_mean_of_its_runs_and_runs_must_share_labels(real):
    runs = [synthetic_run(4), synthetic_run(5)]
    indices = pb.resamples(200, 50)
    per_run = [pb.run_statistics(r, real, indices) for r in runs]
    row = pb.row_statistics(per_run)
    for key in pb.METRICS:
        assert torch.allclose(row[key], (per_run[0][key] + per_run[1][key]) / 2)
    pb.check_paired(runs)
    with pytest.raises(ValueError, match="not paired"):
        pb.check_paired([runs[0], {**runs[1], "labels": runs[1]["labels"].roll(1)}])


# -- per-sample data against the scorer ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def scorer():
    from vq4dit.metrics import digits_scorer

    return digits_scorer(str(ROOT / "data/digit_classifier.safetensors"))


def test_per_sample_data_give_back_the_scorers_metrics(scorer):
    """FID from the stored features, accuracy from the verdicts and PSNR from the squared errors equal what the
    scorer (torchmetrics) and metrics.psnr compute on the same images."""
    from vq4dit.data.digits import digits
    from vq4dit.metrics import psnr, squared_errors

    images, labels = digits(16)
    images, labels = images[:60], labels[:60]
    noisy = (images + 0.3 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    metrics = scorer.score(noisy, labels)
    data = scorer.per_sample(noisy, labels)
    real = pb.RealSide(scorer.real_features()["reference"])
    assert pb.frechet(data["features"], real, torch.arange(60)[None]).item() == pytest.approx(metrics["fid"],
                                                                                              rel=1e-5)
    assert data["correct"].double().mean().item() == pytest.approx(metrics["class_accuracy"], abs=1e-6)
    errors = squared_errors(noisy, images)
    assert (10 * torch.log10(4 / errors.mean())).item() == pytest.approx(psnr(noisy, images), abs=1e-4)


# -- records made by the real job, and the table from them -------------------------------------------------------------
@pytest.fixture(scope="module")
def made(tmp_path_factory, scorer):
    """The fp record and a real rtn-w4pc row made by train.py's job and eval's protocol at test size."""
    tmp = tmp_path_factory.mktemp("made")
    records = Records(tmp / "records", Code())
    eval_cfg = config("eval", f"ckpt={ROOT / 'data/dit_digits'}", "num_samples=20", "sampler.steps=2",
                      f"paths.output_dir={tmp / 'eval'}", f"paths.log_dir={tmp / 'logs'}")
    fp = compare_rows.make_fp(eval_cfg, records, scorer)
    cfg = compare_rows.train_config("rtn-w4pc", 0, eval_cfg, records, "debug=fast", f"paths.output_dir={tmp / 'run'}",
                                    f"paths.log_dir={tmp / 'logs'}")
    row = compare_rows.make_row("rtn-w4pc", 0, eval_cfg, fp, records, scorer, cfg)
    return records, eval_cfg, fp, row


def test_a_made_row_reloads_with_per_sample_data_that_give_its_scores(made, scorer):
    records, eval_cfg, fp, row = made
    again = Records(records.folder, Code())
    assert again.valid(compare_rows.fp_name(eval_cfg)) == fp
    assert again.valid(compare_rows.record_name("rtn-w4pc", 0, eval_cfg)) == row
    data = compare_rows.per_sample(row)
    assert torch.equal(data["labels"], compare_rows.per_sample(fp)["labels"])
    real = pb.RealSide(scorer.real_features()["reference"])
    assert pb.frechet(data["features"], real, torch.arange(20)[None]).item() == pytest.approx(row["fid"], rel=1e-5)
    assert data["correct"].double().mean().item() == pytest.approx(row["class_accuracy"], abs=1e-6)
    psnr = 10 * torch.log10(4 / data["squared_error"].mean()).item()
    assert psnr == pytest.approx(row["psnr_vs_reference"], abs=1e-4)
    assert row["settings"]["seed"] == 0 and row["code"] == Code().digest and row["eval"]["num_samples"] == 20


@pytest.mark.slow
def test_the_table_from_cache_marks_real_differences_and_lists_stale_rows(made, tmp_path):
    """Through the real command line: records of today's code (the fp model's, rtn-w4pc's, and a copy of it whose
    every sample is 2 dB closer to the fp samples) make the table; a record of other code is reported and left out."""
    records, eval_cfg, fp, row = made
    compare_eval = config("eval", f"ckpt={ROOT / 'data/dit_digits'}", "num_samples=20",
                          "paths.output_dir=/unused")  # compare.py's evaluation (100 steps): its records' names
    folder = tmp_path / "records"
    today = Records(folder, Code())

    def copy(record: dict, name: str, tensors: dict | None = None, **change) -> None:
        today.store(name, {**{k: v for k, v in record.items() if k != "folder"}, **change},
                    {**compare_rows.per_sample(record), **(tensors or {})})

    copy(fp, compare_rows.fp_name(compare_eval))
    copy(row, compare_rows.record_name("rtn-w4pc", 0, compare_eval))
    better = 10 ** (-2 / 10) * compare_rows.per_sample(row)["squared_error"]  # every sample 2 dB closer
    copy(row, compare_rows.record_name("rtn-w3pc", 0, compare_eval), {"squared_error": better}, row="rtn-w3pc",
         psnr_vs_reference=row["psnr_vs_reference"] + 2)
    stale = folder / (compare_rows.record_name("rtn-w2pc", 0, compare_eval) + "-00000000000000aa")
    shutil.copytree(row["folder"], stale)
    (stale / "row.json").write_text(json.dumps({**json.loads((stale / "row.json").read_text()),
                                                "code": "00000000000000aa"}))
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "benchmarks/compare.py", "--from-cache", "--rows",
                             "rtn-w4pc,rtn-w3pc,rtn-w2pc", "--seeds", "0", "--num-samples", "20", "--bootstrap", "200",
                             "--records", str(folder), "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                            timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    stale_lines = [line for line in result.stdout.splitlines() if line.startswith("rtn-w2pc seed 0: stale")]
    assert len(stale_lines) == 1 and "by code 00000000000000aa: its file list is not kept" in stale_lines[0]
    table = (out / "results.md").read_text()
    assert f"made by code {Code().digest}" in table and "rtn-w2pc seed 0 (stale)" in table
    lines = {line.split(" | ")[0]: line for line in table.splitlines() if line.startswith("| rtn-")}
    assert lines["| rtn-w3pc − rtn-w4pc"].endswith("| +2.00 [+2.00, +2.00] † |")
    assert "+0.00 [+0.00, +0.00] |" in lines["| rtn-w3pc − rtn-w4pc"]  # FID: the same samples
    assert "†" in lines["| rtn-w3pc"].split(" | ")[6] and "†" not in lines["| rtn-w3pc"].split(" | ")[3]
    setup = json.loads((out / "results.json").read_text())
    assert setup["code"] == Code().digest and setup["not_run"] == ["rtn-w2pc seed 0 (stale)"]
    pair = setup["differences"][-1]
    assert (pair["above"], pair["below"]) == ("rtn-w4pc", "rtn-w3pc")
    assert pair["psnr_vs_reference"] == pytest.approx([2.0, 2.0], abs=1e-9)


def test_the_table_from_cache_without_todays_fp_record_is_refused_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "benchmarks/compare.py", "--from-cache", "--rows", "rtn-w4pc", "--seeds",
                             "0", "--records", str(tmp_path / "records"), "--out", str(tmp_path / "out")], cwd=ROOT,
                            capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: --from-cache: "), result.stderr
    assert f"holds no fp32 record made by code {Code().digest}" in lines[0]
    assert not (tmp_path / "out").exists()


def test_the_deviation_measurement_quantizes_only_the_layers_the_release_adds(compose_cfg):
    """benchmarks/deviations.py: the patch embedder, timestep MLP and final layer get weights on a per-channel 4-bit
    grid (at most 16 values a row) and static 8-bit input ranges; the block linears stay as they were."""
    import copy

    from deviations import OUTER, quantize_outer_layers

    from vq4dit.errors import instantiate
    from vq4dit.quant.act_quantizer import input_quantizer_of
    from vq4dit.quant.block_layers import block_linears

    model = instantiate(compose_cfg("train", "model=dit_tiny").model)
    before = copy.deepcopy(model)
    layers = [m for n, m in model.named_modules() if type(m) in (torch.nn.Linear, torch.nn.Conv2d)
              and any(part in n for part in OUTER.values())]
    inner = {id(m) for b in model.blocks for m in block_linears(b).values()}
    assert layers and not inner & {id(m) for m in layers}
    g = torch.Generator().manual_seed(0)
    rows = (torch.randn(8, 4, 8, 8, generator=g), torch.randint(0, 1000, (8,), generator=g), torch.arange(8) % 10)
    quantize_outer_layers(model, layers, 4, 8, rows, torch.device("cpu"))
    for layer in layers:
        weight = layer.weight.detach().reshape(len(layer.weight), -1)
        assert max(len(row.unique()) for row in weight) <= 16
        quantizer = input_quantizer_of(layer)
        assert quantizer.bits == 8 and quantizer.granularity == "tensor" and not quantizer.dynamic
        assert quantizer.scale.item() != 1.0  # calibrated on the rows, not the initial range
    for (name, p), q in zip(model.named_parameters(), before.parameters()):
        if not any(part in name for part in OUTER.values()):
            assert torch.equal(p, q), name


def test_the_block_inputs_note_gives_each_measured_rows_ratio_and_says_what_is_not_measured():
    from compare import block_inputs_effect
    runs = [{"row": "gptq-w3g64", "seed": seed, "student_inputs": inputs, "output_mse": mse}
            for seed, inputs, mse in ((0, "fp", 2e-4), (0, "quantized", 3e-4), (1, "fp", 4e-4), (1, "quantized", 1e-4))]
    runs.append({"row": "qdit-w4a8", "seed": 0, "student_inputs": "fp", "output_mse": 1.0})  # no pair: left out
    note = block_inputs_effect(runs)
    assert "gptq-w3g64 1.50x / 0.25x;" in note and "qdit" not in note and "other rows not measured" in note
    assert block_inputs_effect([]) == "Its effect is not measured."


def test_the_newest_run_of_a_deviation_is_quoted_whatever_its_folder_is_called(monkeypatch, tmp_path):
    import compare
    runs = {"deviations": ("2026-12-01T10:00:00+00:00", {"embedders": "E.", "recon_steps": "oldest."}),
            "deviations-recon": ("2026-12-04T10:00:00+00:00", {"recon_steps": "newest."}),
            "deviations-recon-before-issue20": ("2026-12-03T10:00:00+00:00", {"recon_steps": "older."})}
    for folder, (date, effects) in runs.items():
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "results.json").write_text(json.dumps({"date": date, "effects": effects}))
    monkeypatch.setattr(compare, "DEVIATION_RESULTS", tmp_path)
    monkeypatch.setattr(compare, "BLOCK_INPUT_RESULTS", tmp_path / "absent.json")
    notes = compare.deviation_notes()
    assert notes["recon_steps"] == f"{compare.DEVIATIONS['recon_steps']} newest."
    assert notes["embedders"].endswith(" E.") and notes["kmeans_points"].endswith(" Its effect is not measured.")


def test_every_reconstruction_length_starts_from_the_same_fp_block_and_is_kept(monkeypatch, tmp_path, one_thread):
    """benchmarks/deviations.py's `recon_steps`: a length measured after another gives what it gives alone (PTQ4DiT
    folds its balancing into the block it is given, so a shared block would drift), a longer reconstruction is
    another measurement, and a finished length is read back, not run again."""
    import deviations

    monkeypatch.setattr(deviations, "CACHE", tmp_path / "cache")
    small = ("model=dit_tiny", "pool.trajectories=4", "pool.size=96", "pool.heldout_trajectories=2",
             "pool.heldout_size=32")
    alone = deviations.recon_steps("w4a8", [(3, 4)], 1, 0, torch.device("cpu"), *small)
    shutil.rmtree(tmp_path / "cache")
    after = deviations.recon_steps("w4a8", [(12, 4), (3, 4)], 1, 0, torch.device("cpu"), *small)
    longer, short = after["lengths"]
    assert short["mse"] == alone["lengths"][0]["mse"] and short["start_mse"] == longer["start_mse"]
    assert longer["mse"] != short["mse"] and (longer["steps"], longer["batch"]) == (12, 4)
    assert (after["as_in_the_table"], after["as_released"]) == (longer["mse"], short["mse"])
    monkeypatch.setattr(deviations, "quantize_block", lambda *a: pytest.fail("a kept length was run again"))
    assert deviations.recon_steps("w4a8", [(12, 4), (3, 4)], 1, 0, torch.device("cpu"), *small) == after
    again = deviations.recon_steps("w4a8", [(3, 4), (12, 4)], 1, 0, torch.device("cpu"), *small)  # each length kept
    assert [m["mse"] for m in again["lengths"]] == [short["mse"], longer["mse"]]


def test_the_release_strength_rounding_decides_offsets_the_rows_settings_leave_undecided(monkeypatch, tmp_path,
                                                                                          one_thread):
    """benchmarks/deviations.py's `rounding`: in 20 steps Adam at the row's lr 1e-3 moves an offset's logit at most
    0.02, and every offset starts undecided (at its weight's fractional part), so nearly all stay undecided; the
    release's strength decides more. Both variants start from the same fp block; the row is kept and read back."""
    import deviations

    monkeypatch.setattr(deviations, "CACHE", tmp_path / "cache")
    small = ("model=dit_tiny", "pool.trajectories=4", "pool.size=96", "pool.heldout_trajectories=2",
             "pool.heldout_size=32", "fit.iterations=20", "fit.batch_size=4")
    row = deviations.rounding("w4a8", 1, 0, torch.device("cpu"), *small)
    table, release = row["settings"]["as in the table"], row["settings"][deviations.RELEASE_ROUNDING]
    assert table["undecided"] > 0.9 and release["undecided"] < table["undecided"]
    assert table["mse"] != release["mse"] and row["length"] == "20x4"
    monkeypatch.setattr(deviations, "quantize_block", lambda *a: pytest.fail("a kept measurement was run again"))
    assert deviations.rounding("w4a8", 1, 0, torch.device("cpu"), *small) == row


def test_a_head_to_head_pair_gets_the_paired_interval_though_rows_lie_between(made, scorer, tmp_path):
    """compare.py's HEAD_TO_HEAD: rtn-w2g64 against gptq-w2g64 with kmeans-w2 between them; gptq's copy of the row
    has every sample 2 dB closer to the fp samples and the same features, so its interval is exactly +2 dB and FID's
    exactly 0, and the pair is listed once, under the table."""
    from argparse import Namespace

    import compare

    records, eval_cfg, fp, row = made
    today = Records(tmp_path / "records", Code())

    def copy(name: str, tensors: dict | None = None, **change) -> dict:
        return today.store(name, {**{k: v for k, v in row.items() if k != "folder"}, **change},
                           {**compare_rows.per_sample(row), **(tensors or {})})

    better = 10 ** (-2 / 10) * compare_rows.per_sample(row)["squared_error"]
    results = {"fp32": [fp], "rtn-w2g64": [copy("a", row="rtn-w2g64")], "kmeans-w2": [copy("b", row="kmeans-w2")],
               "gptq-w2g64": [copy("c", {"squared_error": better}, row="gptq-w2g64",
                                   psnr_vs_reference=row["psnr_vs_reference"] + 2)]}
    out = tmp_path / "out"
    out.mkdir()
    args = Namespace(seeds="0", num_samples=20, bootstrap=200, rows=",".join(list(results)[1:]), from_cache=True,
                     out=str(out), records=str(today.folder))
    compare.write_table(out, args, results, [], today, scorer, 0, [0])
    setup = json.loads((out / "results.json").read_text())
    (pair,) = setup["head_to_head"]
    assert (pair["above"], pair["below"]) == ("rtn-w2g64", "gptq-w2g64")
    assert pair["psnr_vs_reference"] == pytest.approx([2.0, 2.0], abs=1e-9) and pair["fid"] == [0.0, 0.0]
    assert [(d["above"], d["below"]) for d in setup["differences"]] == [
        ("fp32", "rtn-w2g64"), ("rtn-w2g64", "kmeans-w2"), ("kmeans-w2", "gptq-w2g64")]
    head = (out / "results.md").read_text().split("Head to head")[1]
    assert "| gptq-w2g64 − rtn-w2g64 | +0.00 [+0.00, +0.00] |" in head and "+2.00 [+2.00, +2.00] † |" in head


def test_the_figure_keeps_a_long_row_name_left_of_the_samples():
    """The figure's labels sit in a margin as wide as the longest name: its text (the pixels a label changes against
    an unlabelled figure) ends before the first sample's column."""
    from harness import labelled_rows
    from PIL import ImageChops

    samples, labels = torch.full((10, 1, 8, 8), 1.0), torch.arange(10)  # white samples: text would show on them
    long = "gptq-w3g64+pool.student_inputs=quantized"
    named = labelled_rows([("fp32", samples), (long, samples)], labels)
    blank = labelled_rows([("", samples), ("", samples)], labels)
    assert named.size[1] == blank.size[1] and named.size[0] >= blank.size[0]
    first_sample = named.width - 10 * 10 * 3  # 10 samples of 8 + 2 frame pixels, upscaled 3x, at the right
    text = ImageChops.difference(named.crop((0, 0, first_sample, named.height)),
                                 blank.crop((0, 0, first_sample, blank.height)).resize((first_sample, named.height)))
    assert text.getbbox() is not None  # the labels were drawn
    samples_part = named.crop((first_sample, 0, named.width, named.height))
    expected = blank.crop((blank.width - 10 * 10 * 3, 0, blank.width, blank.height))
    assert ImageChops.difference(samples_part, expected).getbbox() is None  # no label pixel over a sample


def test_the_front_page_table_is_the_committed_table():
    """README's comparison table is benchmarks/results/compare/results.md's, line for line; no row is not run."""
    readme = (ROOT / "README.md").read_text()
    results = (ROOT / "benchmarks/results/compare/results.md").read_text()
    front = readme[readme.index("## The comparison"):]
    front = front[:front.index("\n## ", 1)]
    rows = [line for line in front.splitlines() if line.startswith("| ")]
    committed = [line for line in results.splitlines() if line.startswith("| ")]
    assert rows and rows == committed[:len(rows)]
    assert committed[len(rows)].startswith("| row | FID")  # every row of the table, not a part of it
    assert "Not in the table" not in results
