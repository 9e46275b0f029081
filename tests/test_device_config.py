"""Devices are config: cpu, cuda, cuda:1, or blocks spread over several. A device this machine lacks stops a job
in one line naming what it has, before any work."""

import pytest
import torch

from vq4dit.calibration.pipeline import default_trainer
from vq4dit.cli.evaluate import evaluate
from vq4dit.cli.quantize import quantize
from vq4dit.devices import available_devices, lightning_accelerator, resolve_device, resolve_devices
from vq4dit.errors import UserError

MISSING = f"cuda:{torch.cuda.device_count()}"  # one past the last CUDA device: absent on every machine


def test_lightning_runs_on_exactly_the_configured_device():
    assert lightning_accelerator(torch.device("cuda:1")) == ("gpu", [1])
    assert lightning_accelerator(torch.device("cuda")) == ("gpu", 1)
    assert lightning_accelerator(torch.device("cpu")) == ("cpu", 1)
    trainer = default_trainer(torch.device("cpu"), precision="bf16")(max_steps=1)
    assert trainer.strategy.root_device == torch.device("cpu") and trainer.precision == "bf16-mixed"


def test_a_missing_device_is_refused_in_one_line():
    with pytest.raises(UserError) as err:
        resolve_device(MISSING)
    message = str(err.value)
    assert message.startswith(f"device={MISSING} is not available on this machine; available: cpu")
    assert all(name in message for name in available_devices()) and "\n" not in message
    with pytest.raises(UserError, match="device=gpu0 is not a device name; valid: cpu, cuda, cuda:<index>"):
        resolve_device("gpu0")


def test_several_devices():
    assert resolve_devices("cpu", 2) == [torch.device("cpu")] * 2
    assert resolve_devices("cpu", 1) == [torch.device("cpu")]
    with pytest.raises(UserError, match="devices=0; valid"):
        resolve_devices("cpu", 0)
    with pytest.raises(UserError, match=r"devices=\[1, 2\] with device=cpu; valid: device=cuda"):
        resolve_devices("cpu", [1, 2])
    with pytest.raises(UserError, match=f"device={MISSING} names one device but devices=2"):
        resolve_devices(MISSING, 2)


@pytest.mark.parametrize("task", ["train", "eval"])
def test_jobs_refuse_a_missing_device_before_any_work(compose_cfg, tmp_path, task):
    extra = ["model=dit_tiny", "pool.trajectories=2", "log_samples=0"] if task == "train" else ["model=dit_tiny",
                                                                                             f"ckpt={tmp_path}"]
    cfg = compose_cfg(task, *extra, f"device={MISSING}")
    with pytest.raises(UserError, match=f"device={MISSING} is not available on this machine"):
        (quantize if task == "train" else evaluate)(cfg)
    assert not (tmp_path / "logs" / "train" / "cache").exists() and not (tmp_path / "run").exists()
