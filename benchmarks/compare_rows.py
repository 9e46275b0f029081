"""A row of the comparison: made once by the code of its day, kept as a record, served only to that same code.

A row (`<method>-<preset>[-<act>][+<setting>=<value>...]` at one calibration seed, or the fp model) is quantized by
train.py's job and scored by eval's protocol on the reference digits DiT. Its record is a folder under
benchmarks/results/compare-rows/ (committed, so a clean checkout rebuilds the table and a long regeneration is
resumable across sittings), named `<row>-s<seed>-<key>-<code>`:
- `row.json`: the metrics, sizes and calibration time; the settings the row resolved to; the code digest, the commit
  and the device it was made on (written last: a folder without it is an interrupted row, made again);
- `per_sample.safetensors`: what its scores are made of, sample by sample (FID's features, whether the classifier
  found the asked-for digit, the squared error against the fp model's sample from the same noise), for the paired
  bootstrap (paired_bootstrap.py); and the figure's samples. The fp model's record also keeps all its samples, the
  PSNR reference of every row made after it.
Checkpoints stay under logs/benchmark/compare-rows/ (ignored by git; the table does not need them).

The code digest covers every file that decides what a row is (CODE). A record is served only where today's digest
is the one it was made by; any other record of the row is stale: reported in one line naming the files and settings
that differ, never used, never overwritten (today's record goes into a folder of its own).
"""

import hashlib
import json
import os
import shutil
import statistics
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from harness import ROOT, config
from omegaconf import OmegaConf
from safetensors.torch import load_file

from vq4dit.calibration.model_fit import resolved
from vq4dit.calibration.pipeline import resolve_student_inputs
from vq4dit.cli.evaluate import load_model, sample_and_score
from vq4dit.cli.quantize import build_method, quantize
from vq4dit.errors import instantiate
from vq4dit.files import save_safetensors
from vq4dit.metrics import squared_errors
from vq4dit.models.embedders import shared_embedders
from vq4dit.quant.checkpoint import TENSORS, load_quantized, read_manifest

RECORDS = ROOT / "benchmarks" / "results" / "compare-rows"
CHECKPOINTS = (ROOT / "logs").resolve() / "benchmark" / "compare-rows"  # physical: a worktree may link its logs
# What decides a row, so what its record is keyed on: the package (calibration, sampling, scoring, and the Hydra
# plugin that registers the settings' defaults), the configs every value comes from, the reference DiT and the
# classifier the rows are made of and scored with, and this file (row name -> run -> record). Left out: train.py /
# eval.py (thin wrappers of the jobs this file calls itself), harness.py (its `config` only composes the configs
# hashed here), compare.py and paired_bootstrap.py (they read records: how the table is drawn changes no row),
# tests and docs. The installed libraries and the device are recorded with each row, not keyed on: a row made on a
# GPU or with another torch is the same experiment, a few ulps apart.
CODE = ("src/**/*.py", "configs/**/*.yaml", "data/dit_digits/*", "data/digit_classifier.*",
        "benchmarks/compare_rows.py")
# Config keys that do not change what a row measures (where files go, logging, threads, devices: recorded apart).
NOT_SETTINGS = ("paths.", "hydra.", "logger.", "task_name", "resume", "log_samples", "dry_run", "estimate.",
                "threads", "devices", "trainer.enable_progress_bar", "method.", "quant.", "act.")
LIBRARIES = ("torch", "diffusers", "torchmetrics", "lightning")


# -- the code ------------------------------------------------------------------------------------------------------
def code_files(root: Path = ROOT) -> dict[str, str]:
    """Every file of CODE under `root` -> the sha256 of its bytes (paths relative to `root`, sorted)."""
    paths = {p for pattern in CODE for p in root.glob(pattern) if p.is_file() and "__pycache__" not in p.parts}
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(paths, key=lambda p: str(p.relative_to(root)))}


def code_digest(files: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]


def git_state(root: Path = ROOT) -> dict:
    """The commit checked out and the CODE files that differ from it (None where `root` is not a git checkout)."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "modified": None}
    status = git("status", "--porcelain", "--untracked-files=all", "--", *CODE) or ""
    return {"commit": commit.strip(), "modified": sorted(line[3:] for line in status.splitlines() if line.strip())}


class Code:
    """Today's code: its files' digests, their digest, and where it stands against git."""

    def __init__(self, root: Path = ROOT):
        self.root = root
        self.files = code_files(root)
        self.digest = code_digest(self.files)
        self.git = git_state(root)

    def describe(self) -> str:
        commit, modified = self.git["commit"], self.git["modified"]
        where = "no git checkout" if commit is None else f"commit {commit[:10]}" + (
            f" with {len(modified)} of its files changed ({_names(modified)})" if modified else "")
        return f"code {self.digest} ({where})"


# -- rows and their settings ------------------------------------------------------------------------------------------
def overrides_for(row: str) -> list[str]:
    """`<method>-<quant preset>[-<act preset>][+<setting>=<value> ...]` -> train.py overrides; a setting without a
    dot is the method's (`vq4dit-w3+candidates=3`), one with a dot is any config key (`+pool.student_inputs=...`)."""
    base, *settings = row.split("+")
    method, quant, *act = base.split("-")
    return [f"method={method}", f"quant={quant}", *(f"act={a}" for a in act),
            *(s if "." in s.split("=")[0] else f"method.{s}" for s in settings)]


def row_settings(cfg) -> dict:
    """Every value the config resolves to that decides the row, flat (`pool.size`), with the method as its record
    gives it (presets and activation defaults resolved) and the choices left to the method made; paths inside the
    checkout relative to it, so a record made in another checkout compares equal."""
    method = build_method(cfg)
    values = {key: value for key, value in _flat(OmegaConf.to_container(cfg, resolve=True))
              if not key.startswith(NOT_SETTINGS) and not key.endswith("device")}
    values.update({f"method.{key}": value for key, value in _flat(method.record())})
    values["model_fit.iterations"] = resolved(instantiate(cfg.model_fit), method).iterations
    values["pool.student_inputs"] = resolve_student_inputs(cfg.pool.student_inputs, method)
    root = str(ROOT)
    return {key: value.replace(root, "<root>") if isinstance(value, str) else value
            for key, value in sorted(values.items())}


def eval_settings(eval_cfg) -> dict:
    """What decides the scores besides the row: the sample count, the eval seed and the sampler."""
    sampler = {key: value for key, value in _flat(OmegaConf.to_container(eval_cfg.sampler, resolve=True))
               if not key.endswith("device")}
    return {"num_samples": eval_cfg.num_samples, "seed": eval_cfg.seed, "sampler": sampler}


def row_key(overrides: list[str], seed: int, eval_cfg) -> str:
    keyed = {"overrides": overrides, "seed": seed, **eval_settings(eval_cfg)}
    return hashlib.sha1(json.dumps(keyed, sort_keys=True, default=str).encode()).hexdigest()[:10]


def row_slug(row: str) -> str:
    return row.replace("+", "_").replace("=", "-")


# -- records -----------------------------------------------------------------------------------------------------------
class Records:
    """The records of one code under `folder`; `code_folder` keeps each digest's file list (to name what differs)."""

    def __init__(self, folder: Path, code: Code):
        self.folder, self.code = Path(folder), code
        self.code_folder = self.folder / "code"

    def path(self, name: str) -> Path:
        return self.folder / f"{name}-{self.code.digest}"

    def valid(self, name: str) -> dict | None:
        """The record `name` made by today's code, if there is one."""
        return _read(self.path(name))

    def stale(self, name: str, settings: dict | None = None) -> str | None:
        """One line on the newest record of `name` made by other code (None if there is none)."""
        found = [r for r in map(_read, self.folder.glob(f"{name}-*")) if r and r.get("code") != self.code.digest]
        if not found:
            return None
        old = max(found, key=lambda r: r.get("made", ""))
        made = f"made {old.get('made', 'at an unrecorded time')}" + (
            f" at commit {old['commit'][:10]}" if old.get("commit") else "")
        if "code" not in old:
            return f"stale: {made}, before records named their code"
        files = self.files_of(old["code"])
        what = "its file list is not kept" if files is None else _file_changes(files, self.code.files)
        if settings is not None and old.get("settings") is not None:
            before = old["settings"]
            changed = sorted(k for k in set(settings) | set(before) if settings.get(k) != before.get(k))
            if changed:
                what += "; settings " + _names([f"{k} ({before.get(k)} -> {settings.get(k)})"
                                                 for k in changed])
        return f"stale: {made} by code {old['code']}: {what}"

    def equivalent(self, settings: dict, evaluation: dict) -> dict | None:
        """A record of today's code under another row name that resolved to the same settings and evaluation."""
        for path in sorted(self.folder.glob(f"*-{self.code.digest}")):
            record = _read(path)
            if record and record.get("settings") == settings and record.get("eval") == evaluation:
                return record
        return None

    def files_of(self, digest: str) -> dict[str, str] | None:
        path = self.code_folder / f"{digest}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def store(self, name: str, row: dict, tensors: dict[str, torch.Tensor]) -> dict:
        """Writes the record (the tensors, then row.json last; each under a temporary name, then renamed)."""
        folder = self.path(name)
        folder.mkdir(parents=True, exist_ok=True)
        self.code_folder.mkdir(parents=True, exist_ok=True)
        code_list = self.code_folder / f"{self.code.digest}.json"
        if not code_list.exists():
            _write(code_list, json.dumps(self.code.files, indent=1) + "\n")
        tmp = folder / f"per_sample.safetensors.tmp{os.getpid()}"
        save_safetensors({k: t.contiguous() for k, t in tensors.items()}, tmp)
        os.replace(tmp, folder / "per_sample.safetensors")
        row = {**row, "code": self.code.digest, **{k: self.code.git[k] for k in ("commit", "modified")},
               "made": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "versions": {lib: _version(lib) for lib in LIBRARIES}, "threads": torch.get_num_threads()}
        _write(folder / "row.json", json.dumps(row, indent=2, default=str) + "\n")
        return {**row, "folder": str(folder)}


def per_sample(record: dict) -> dict[str, torch.Tensor]:
    return load_file(Path(record["folder"]) / "per_sample.safetensors")


# -- making rows -------------------------------------------------------------------------------------------------------
def fp_name(eval_cfg) -> str:
    return f"fp32-{row_key(['fp32'], 0, eval_cfg)}"


def make_fp(eval_cfg, records: Records, scorer) -> dict:
    """The fp model's record: its scores, per-sample data and all its samples (PSNR's reference for every row)."""
    model = load_model(eval_cfg.model, eval_cfg.ckpt)
    images, labels, metrics = sample_and_score(eval_cfg, model)
    aliases = tuple(f"{alias}." for alias in shared_embedders(model.transformer))  # stored once, as checkpoints do
    params = sum(p.numel() for n, p in model.transformer.named_parameters() if not n.startswith(aliases))
    row = {"row": "fp32", **metrics, "bits": 32.0, "checkpoint_bytes": 4 * params, "calibration_s": None,
           "activations": "fp32", "eval": eval_settings(eval_cfg), "device": eval_cfg.device}
    return records.store(fp_name(eval_cfg), row, {**sample_data(scorer, images, labels), "images": images.half()})


def record_name(row: str, seed: int, eval_cfg) -> str:
    return f"{row_slug(row)}-s{seed}-{row_key(overrides_for(row), seed, eval_cfg)}"


def train_config(row: str, seed: int, eval_cfg, records: Records, *overrides: str):
    """train.py's config for `row` at `seed`, writing under CHECKPOINTS/<its record's folder name>/; `overrides`
    come last (tests shrink the run with them)."""
    folder = CHECKPOINTS / records.path(record_name(row, seed, eval_cfg)).name
    return config("train", *overrides_for(row), f"seed={seed}", f"paths.output_dir={folder / 'train'}",
                  f"paths.log_dir={folder / 'logs'}", "resume=false", "log_samples=0",
                  "trainer.enable_progress_bar=false", *overrides)


def make_row(row: str, seed: int, eval_cfg, fp: dict, records: Records, scorer, cfg) -> dict:
    """Quantize `row` at `seed` with train.py's job (`cfg`, from `train_config`), score it with eval's protocol on
    the fp model's noise, and store its record."""
    for folder in (cfg.paths.output_dir, cfg.paths.log_dir):  # a row interrupted before its record: made again
        shutil.rmtree(folder, ignore_errors=True)
    start = time.time()
    ckpt = quantize(cfg)
    wall = time.time() - start
    manifest = read_manifest(ckpt)
    fp_images = per_sample(fp)["images"].float()
    images, labels, metrics = sample_and_score(eval_cfg, load_quantized(ckpt, cfg.model), compare_to=fp_images)
    blocks = manifest["blocks"]
    result = {"row": row, **metrics, "seed": seed, "bits": manifest["sizes"]["blocks_bits_per_weight"],
              "checkpoint_bytes": os.path.getsize(ckpt / TENSORS), "calibration_s": round(wall, 1),
              "checkpoint": shown(ckpt), "activations": activations_label(manifest["method"].get("act")),
              "kept_start_blocks": sum(b["kept"] == "start" for b in blocks) if "method_mse" in blocks[0] else None,
              "shipped_block_mse": statistics.mean(b["shipped_mse"] for b in blocks),
              "settings": row_settings(cfg), "eval": eval_settings(eval_cfg), "device": cfg.device}
    data = {**sample_data(scorer, images, labels), "squared_error": squared_errors(images, fp_images)}
    return records.store(record_name(row, seed, eval_cfg), result, data)


def sample_data(scorer, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per sample: the labels, FID's features, the classifier's verdict; and the figure's samples (the first of each
    class, as harness.labelled_rows picks them)."""
    picks = torch.cat([(labels == c).nonzero().squeeze(1)[:1] for c in labels.unique()])
    return {"labels": labels, **scorer.per_sample(images, labels), "figure": images[picks].half(),
            "figure_labels": labels[picks]}


def activations_label(act: dict | None) -> str:
    """How a row quantizes activations, from its manifest: bits, granularity, static or dynamic."""
    if act is None:
        return "fp32"
    groups = act["group_size"] or "the searched sizes"
    granularity = {"tensor": "per tensor", "token": "per token", "token_group": f"per token, groups of {groups}"}
    granularity = granularity[act["granularity"]]
    return f"A{act['bits']}, {granularity}, {'dynamic' if act['dynamic'] else 'static'}"


# -- helpers -----------------------------------------------------------------------------------------------------------
def _flat(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flat(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def shown(path: Path) -> str:
    """A path relative to the checkout when inside it (records and tables are read in other checkouts too)."""
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(Path(path).resolve())


def _read(folder: Path) -> dict | None:
    path = folder / "row.json"
    return {**json.loads(path.read_text()), "folder": str(folder)} if path.is_file() else None


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _file_changes(old: dict[str, str], new: dict[str, str]) -> str:
    changed = [p for p in new if p in old and old[p] != new[p]]
    added, removed = [p for p in new if p not in old], [p for p in old if p not in new]
    parts = [f"{_names(paths)} {what}" for paths, what in ((changed, "changed"), (added, "added"),
                                                             (removed, "removed")) if paths]
    return "; ".join(parts) or "no file differs (the digest's definition changed)"


def _names(items: list[str], most: int = 4) -> str:
    return ", ".join(items[:most]) + (f" and {len(items) - most} more" if len(items) > most else "")


def _version(library: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(library)
    except PackageNotFoundError:
        return None
