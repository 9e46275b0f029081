"""The two Hydra tasks that made the shipped reference models in data/ (see data/train_reference.py)."""

import json
import time
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import EMAWeightAveraging
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, TensorDataset

from vq4dit.data.digits import digits, split
from vq4dit.errors import UserError
from vq4dit.files import save_safetensors
from vq4dit.models.checkpoint_io import save_diffusers_folder
from vq4dit.models.classifier import DigitClassifier
from vq4dit.models.dit import build_transformer
from vq4dit.reference.classifier_training import ClassifierTraining
from vq4dit.reference.dit_training import DiffusionTraining, untied_copy


def fit_reference(cfg: DictConfig) -> Path:
    out = Path(cfg.reference.out)
    if out.exists():
        raise UserError(f"reference.out={out} already exists; pass another reference.out (nothing is overwritten)")
    out.parent.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True)
    torch.set_num_threads(cfg.threads) if cfg.get("threads") else None
    fit = {"dit": _fit_dit, "classifier": _fit_classifier}[cfg.reference.kind]
    return fit(cfg, out)


def _trainer(cfg: DictConfig, **kwargs) -> L.Trainer:
    logger = instantiate(cfg.logger)
    return instantiate(cfg.trainer, logger=logger, enable_checkpointing=False, **kwargs)


def _fit_dit(cfg: DictConfig, out: Path) -> Path:
    r = cfg.reference
    images, labels = digits(cfg.model.arch.sample_size)
    transformer = build_transformer(OmegaConf.to_container(cfg.model.arch), cfg.model.timestep_shift, cfg.seed)
    module = DiffusionTraining(transformer, lr=r.lr, label_dropout=r.label_dropout)
    loader = DataLoader(TensorDataset(images, labels), batch_size=r.batch_size, shuffle=True, drop_last=True)
    trainer = _trainer(cfg, max_steps=r.steps, callbacks=[EMAWeightAveraging(decay=r.ema_decay)])
    start = time.time()
    trainer.fit(module, loader)  # EMAWeightAveraging copies the EMA weights into the module at the end
    summary = {
        "task": "python data/train_reference.py reference=dit",
        "steps": r.steps, "batch_size": r.batch_size, "lr": r.lr, "ema_decay": r.ema_decay,
        "label_dropout": r.label_dropout, "final_train_loss": float(trainer.callback_metrics["train/loss"]),
        "wall_time_s": round(time.time() - start, 1), "train_images": len(images),
        "parameters": sum(p.numel() for p in untied_copy(module.transformer).parameters()),
    }
    meta = {"name": cfg.model.name, "timestep_shift": cfg.model.timestep_shift, "training": summary}
    save_diffusers_folder(untied_copy(module.transformer).eval(), out, meta)
    return out


def _fit_classifier(cfg: DictConfig, out: Path) -> Path:
    r = cfg.reference
    images, labels = digits(cfg.model.arch.sample_size)
    train_idx, test_idx = split(labels, r.train_fraction, seed=cfg.seed)
    classifier = DigitClassifier(num_classes=int(labels.max()) + 1)
    module = ClassifierTraining(classifier, lr=r.lr)
    train = DataLoader(TensorDataset(images[train_idx], labels[train_idx]), batch_size=r.batch_size, shuffle=True)
    test = DataLoader(TensorDataset(images[test_idx], labels[test_idx]), batch_size=512)
    trainer = _trainer(cfg, max_epochs=r.epochs)
    start = time.time()
    trainer.fit(module, train, test)
    classifier.eval()
    with torch.no_grad():
        acc = (classifier(images[test_idx]).argmax(1) == labels[test_idx]).float().mean().item()
    summary = {"task": "python data/train_reference.py reference=classifier", "epochs": r.epochs,
               "train_images": len(train_idx), "heldout_images": len(test_idx), "heldout_accuracy": round(acc, 4),
               "wall_time_s": round(time.time() - start, 1)}
    tmp = out.with_name(out.name + ".tmp")
    save_safetensors(classifier.state_dict(), tmp, metadata={"summary": json.dumps(summary)})
    tmp.rename(out)
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    return out
