"""The calibration's settings classes (configs/model_fit/, configs/pool/), apart from the code that runs them: a
command's preflight reads their fields without importing Lightning, diffusers or the model."""

from dataclasses import dataclass
from typing import Literal

from vq4dit.settings import check_settings, setting


@dataclass(frozen=True)
class ModelFitSettings:
    """The model-level fit after the block loop (configs/model_fit/: default, none, outputs)."""

    # 0: no model-level fit; None: the method's choice (`Method.model_fit_iterations`)
    iterations: int | None = setting(None, low=0)
    batch_size: int = setting(16, low=1)
    lr: float = setting(3e-5, low=0, low_open=True)  # measured: benchmarks/results/ablation-model-fit
    rmsprop_alpha: float = setting(0.9, low=0, high=1, low_open=True, high_open=True)
    log_every: int = setting(10, low=1)

    def __post_init__(self):
        check_settings(self, "model_fit")


@dataclass(frozen=True)
class PoolSettings:
    """The zero-data calibration pool (configs/pool/): block inputs captured from the fp model's own sampling."""

    # null: one per class, at least 64 (DiT-XL/2: 1000); labels balanced over the classes
    trajectories: int | None = setting(None, low=1)
    # rows (x_t, t, y) kept, evenly per trajectory, its guided row first: what calibration trains on (only these
    # rows are held while sampling, never every step's latents)
    size: int = setting(2048, low=1)
    heldout_trajectories: int = setting(8, low=1)  # trajectories of their own noise and labels, never trained on
    heldout_size: int = setting(256, low=1)        # rows kept from them: block errors are measured here
    # what a block's student sees: fp (paper: the fp blocks' outputs) | quantized (its quantized predecessor's
    # outputs) | None: the method's choice (`Method.student_inputs`); fp whenever blocks run on several devices
    student_inputs: Literal["fp", "quantized"] | None = None

    def __post_init__(self):
        check_settings(self, "pool")
