"""`python train.py quant=w3`: vector-quantize a DiT block by block with zero-data calibration.

The pipeline is short and visible: capture the pool of block-0 inputs from the full-precision sampler once; for
each block compute the teacher's outputs, quantize and calibrate a student copy with its own Trainer, save it,
and move the pool on to the next block's inputs. Finished blocks live in a cache folder keyed by the config, so
rerunning the same command after a crash continues at the first unfinished block and ends with the same
checkpoint an uninterrupted run writes.
"""

import copy
import hashlib
import json
import logging
import math
import os
import time
import warnings
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, RandomSampler, TensorDataset
from tqdm.auto import tqdm

from vq4dit.artifacts import image_grid
from vq4dit.errors import UserError, instantiate
from vq4dit.models import ConditionalDiT
from vq4dit.quant.block_calibration import BlockCalibration
from vq4dit.quant.block_layers import block_linears, replace_layer
from vq4dit.quant.checkpoint import CODEBOOK_DTYPE, save_quantized
from vq4dit.quant.vq_linear import SoftVQLinear, VQLinear
from vq4dit.quant.zero_data import ZeroDataBlockInputs
from vq4dit.sampling import balanced_labels

log = logging.getLogger(__name__)
# Teacher and student deliberately stay in eval mode during fit (see BlockCalibration.train).
warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
METHODS = ("vq4dit", "classic_vq", "kmeans")
SWITCHES = {"ratio_init": ("uniform", "inverse_distance"), "codebook_training": ("joint", "after_freeze"),
            "regularizer": ("paper", "code"), "reg_schedule": ("constant", "linear"),
            "student_inputs": ("fp", "quantized")}


def quantize(cfg: DictConfig) -> Path:
    method = OmegaConf.to_container(cfg.method, resolve=True)
    k, d = int(cfg.quant.k), int(cfg.quant.d)
    model = instantiate(cfg.model).to(cfg.device)
    check_quantizable(model, k, d, method)
    out = Path(cfg.paths.output_dir)
    if (out / "checkpoint").exists():
        raise UserError(f"{out / 'checkpoint'} already exists; earlier results are never overwritten")
    cache = block_cache(cfg, out)
    logger = instantiate(cfg.logger)
    sampler = instantiate(cfg.sampler)
    start = time.time()
    pool = ZeroDataBlockInputs(model, sampler, method["pool"]["trajectories"], method["pool"]["size"], cfg.seed)
    student_hidden = pool.hidden.clone() if method["student_inputs"] == "quantized" else None
    eval_rows = torch.randperm(len(pool), generator=torch.Generator().manual_seed(cfg.seed))[: method["eval_rows"]]
    fp_model = copy.deepcopy(model) if cfg.log_samples else None
    stats = []
    for i in tqdm(range(len(model.blocks)), desc="blocks"):
        block = model.blocks[i]
        targets = pool.block_outputs(block)
        inputs = pool.hidden if student_hidden is None else student_hidden
        path = cache / f"block_{i:03d}.safetensors"
        if path.exists():
            layers, block_stats = load_block(path, block)
            log.info("block %d: resumed from %s", i, path)
        else:
            layers, block_stats = calibrate_block(block, i, inputs, pool, targets, eval_rows, k, d, method, cfg, logger)
            save_block(path, layers, block_stats)
        for name, layer in layers.items():
            replace_layer(block, name, layer.to(cfg.device))
        stats.append(block_stats)
        _log_block(logger, i, block_stats)
        if student_hidden is not None:
            student_hidden = pool.block_outputs(block, student_hidden)
        pool.hidden = targets
    calib_time = time.time() - start
    manifest = {"model": OmegaConf.to_container(cfg.model, resolve=True), "quant": OmegaConf.to_container(cfg.quant),
                "method": method, "seed": cfg.seed, "calibration_seconds": round(calib_time, 1), "blocks": stats}
    ckpt = save_quantized(model, out / "checkpoint", manifest)
    if fp_model is not None:
        _log_sample_grids(logger, fp_model, model, sampler, cfg)
    logger.finalize("success")
    log.info("wrote %s (calibration %.1f s)", ckpt, calib_time)
    return ckpt


def check_quantizable(model: ConditionalDiT, k: int, d: int, method: dict) -> None:
    """Every way the configured (k, d) or method can fail, before any work is done."""
    if method["name"] not in METHODS:
        raise UserError(f"method.name={method['name']}; valid: {', '.join(METHODS)}")
    if k < 2 or d < 1:
        raise UserError(f"quant.k={k}, quant.d={d}: need k >= 2 and d >= 1")
    for name, layer in block_linears(model.blocks[0]).items():
        if layer.in_features % d:
            raise UserError(f"quant.d={d} does not divide the input width {layer.in_features} of {name}; "
                            f"use a divisor of {math.gcd(*[l.in_features for l in block_linears(model.blocks[0]).values()])}")
        if k > layer.weight.numel() // d:
            raise UserError(f"quant.k={k} is larger than the {layer.weight.numel() // d} sub-vectors of {name} "
                            f"at d={d}; use k <= {layer.weight.numel() // d}")
    n = method.get("candidates", 1)
    if method["name"] == "vq4dit" and not 1 <= n <= k:
        raise UserError(f"method.candidates={n}; valid: 1..k ({k})")
    for key, valid in SWITCHES.items():
        if method[key] not in valid:
            raise UserError(f"method.{key}={method[key]}; valid: {', '.join(valid)}")
    if not 0 < method["harden_at"] <= 1:
        raise UserError(f"method.harden_at={method['harden_at']}; valid: a fraction in (0, 1]")


def block_cache(cfg: DictConfig, out: Path) -> Path:
    """Where finished blocks are kept: keyed by everything that determines them, so the same command resumes."""
    if not cfg.resume:
        (out / "blocks").mkdir(parents=True, exist_ok=True)
        return out / "blocks"
    keyed = {key: OmegaConf.to_container(cfg[key], resolve=True) for key in ("model", "quant", "method", "sampler", "trainer")}
    keyed["seed"] = cfg.seed
    digest = hashlib.sha1(json.dumps(keyed, sort_keys=True, default=str).encode()).hexdigest()[:10]
    folder = Path(cfg.paths.log_dir) / "train" / "cache" / f"{cfg.model.name}-{cfg.quant.name}-{cfg.method.name}-{digest}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(keyed, indent=2, default=str) + "\n")
    return folder


def calibrate_block(block, index, inputs, pool, targets, eval_rows, k, d, method, cfg, logger):
    L.seed_everything(cfg.seed + index, workers=True, verbose=False)
    student = copy.deepcopy(block)
    for j, (name, linear) in enumerate(block_linears(block).items()):
        kmeans_args = {"iters": method["kmeans_iters"], "seed": cfg.seed + 1000 * index + j,
                       "max_points": method["kmeans_points_per_codeword"] * k}
        if method["name"] == "vq4dit":
            layer = SoftVQLinear.from_linear(linear, k, d, method["candidates"], method["ratio_init"], **kmeans_args)
        else:
            layer = VQLinear.from_linear(linear, k, d, **kmeans_args)
        replace_layer(student, name, layer.to(cfg.device))
    data = TensorDataset(inputs, pool.timesteps, pool.labels, targets)
    eval_batch = tuple(t[eval_rows] for t in data.tensors)
    module = BlockCalibration(copy.deepcopy(block), student, method, index, eval_batch)
    stats = {"block": index, "kmeans_mse": _kmeans_mse(block, student, module)}
    module.mse_scale = max(stats["kmeans_mse"], 1e-12)
    if method["iterations"] > 0:
        sampler = RandomSampler(data, replacement=True, num_samples=method["iterations"] * method["batch_size"],
                                generator=torch.Generator().manual_seed(cfg.seed + index))
        loader = DataLoader(data, batch_size=method["batch_size"], sampler=sampler)
        trainer = instantiate(cfg.trainer, max_steps=method["iterations"], logger=logger, enable_checkpointing=False,
                              limit_val_batches=0, num_sanity_val_steps=0)
        trainer.fit(module, loader)
        stats.update(module.stats)
    layers = {name: (layer.to_hard(CODEBOOK_DTYPE) if isinstance(layer, SoftVQLinear) else _rounded(layer)).cpu()
              for name, layer in block_linears(student).items()}
    shipped = copy.deepcopy(block)
    for name, layer in layers.items():
        replace_layer(shipped, name, layer.to(cfg.device))
    module.student = shipped
    stats["hard_mse"] = module.eval_mse()  # the block as it ships: hard codes, fp16 codebook
    return layers, stats


def _kmeans_mse(block, student, module) -> float:
    """Block MSE of plain k-means VQ: every layer's sub-vectors on their nearest codeword."""
    plain = copy.deepcopy(block)
    for name, layer in block_linears(student).items():
        codes = layer.candidates[:, 0] if isinstance(layer, SoftVQLinear) else layer.codes
        bias = None if layer.bias is None else layer.bias.detach().clone()
        replace_layer(plain, name, VQLinear(codes, layer.codebook.detach().clone(), bias,
                                            layer.out_features, layer.in_features))
    with torch.no_grad():
        x, t, y, target = (v.to(module.device) for v in module.eval_batch)
        return F.mse_loss(plain(x, timestep=t, class_labels=y), target).item()


def _rounded(layer: VQLinear) -> VQLinear:
    return VQLinear(layer.codes, layer.codebook.detach().to(CODEBOOK_DTYPE).float(),
                    None if layer.bias is None else layer.bias.detach().clone(), layer.out_features, layer.in_features)


def save_block(path: Path, layers: dict[str, VQLinear], stats: dict) -> None:
    tensors = {f"{name}.{key}": t.detach().contiguous().cpu() for name, layer in layers.items()
               for key, t in layer.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, tmp, metadata={"stats": json.dumps(stats)})
    os.replace(tmp, path)


def load_block(path: Path, block) -> tuple[dict[str, VQLinear], dict]:
    tensors = load_file(path)
    with safe_open(path, "pt") as f:
        stats = json.loads(f.metadata()["stats"])
    layers = {}
    for name, linear in block_linears(block).items():
        layers[name] = VQLinear(tensors[f"{name}.codes"], tensors[f"{name}.codebook"], tensors.get(f"{name}.bias"),
                                linear.out_features, linear.in_features)
    return layers, stats


def _log_block(logger, index: int, stats: dict) -> None:
    for key in ("kmeans_mse", "soft_mse", "hard_mse_at_harden", "hard_mse"):
        if key in stats:
            logger.experiment.add_scalar(f"block_mse/{key}", stats[key], index)


def _log_sample_grids(logger, fp_model, model, sampler, cfg) -> None:
    labels = balanced_labels(cfg.log_samples, model.num_classes)
    for tag, m in (("fp", fp_model), ("quantized", model)):
        images = sampler.sample(m, labels, seed=cfg.seed, progress=False)
        grid = torch.from_numpy(image_grid(images, labels, max(1, cfg.log_samples // model.num_classes)))
        logger.experiment.add_image(f"samples/{tag}", grid, 0, dataformats="HW" if grid.ndim == 2 else "HWC")
