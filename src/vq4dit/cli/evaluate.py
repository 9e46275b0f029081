"""`python eval.py ckpt=...`: sample from a full-precision or quantized DiT and score it.

Samples stream batch by batch into the scorer, into `samples.npz` (the ADM evaluator's format: uint8 N x H x W x C
under `arr_0`, labels under `arr_1`) and, with `compare_to`, into PSNR against another run's `samples.npz`. Only the
grid's samples stay in memory (and, on ImageNet, the samples' pool features for precision/recall). The real images'
features the scorer compares with come from a content-keyed cache in `logs/eval/cache/` (`reference_cache`,
`vq4dit.reference_cache`). The seconds of each phase and the samples per second of sampling and of scoring are
printed and written to `speed.json`.
"""

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from omegaconf import DictConfig

from vq4dit.artifacts import fresh, grid_indices, image_grid, save_png, to_uint8, write_json
from vq4dit.cli.config_schema import validate
from vq4dit.cli.outputs import EVAL_RESULTS
from vq4dit.devices import resolve_device
from vq4dit.errors import UserError, instantiate
from vq4dit.imagenet.adm_npz import AdmSampleWriter, open_npz_array
from vq4dit.metrics import SamplesPSNR
from vq4dit.models import ConditionalDiT
from vq4dit.quant.checkpoint import is_quantized_checkpoint, load_quantized
from vq4dit.reference_cache import ReferenceCache
from vq4dit.sampling import balanced_labels
from vq4dit.seeds import stream_seed

log = logging.getLogger(__name__)
OUTPUTS = EVAL_RESULTS


def load_model(model_cfg: DictConfig, ckpt: str, decode: str = "per_forward") -> ConditionalDiT:
    """A quantized checkpoint folder (manifest.json) or full-precision weights for the configured model;
    `decode` says how a quantized one runs (per_forward: codes decoded in each forward; once: dense)."""
    path = Path(ckpt)
    if is_quantized_checkpoint(path):
        return load_quantized(path, model_cfg, decode=decode)
    return instantiate(model_cfg, weights=str(path))


def reference_cache(cfg: DictConfig) -> ReferenceCache:
    """Where eval keeps the real images' features: `<paths.log_dir>/eval/cache/`, or nowhere with
    `reference_cache=false` (computed every run)."""
    return ReferenceCache(Path(cfg.paths.log_dir) / "eval" / "cache" if cfg.get("reference_cache", True) else None)


def sample_and_score(cfg: DictConfig, model: ConditionalDiT, compare_to: torch.Tensor | Path | None = None, *,
                     scorer=None, samples: Path | None = None, keep: str = "all",
                     phases: dict[str, float] | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The eval protocol, shared by eval.py and the benchmarks: (samples in [-1, 1] on the CPU, their labels,
    metrics). `compare_to`: another run's samples (adds PSNR), as images in [-1, 1] or as its samples.npz;
    `samples`: where to write this run's samples.npz; `keep`: return "all" samples or only the "grid"'s;
    `phases`: seconds of sampling, scoring and writing are added to it."""
    scorer = scorer if scorer is not None else instantiate(cfg.metric, cache=reference_cache(cfg))
    clock = PhaseClock(torch.device(cfg.device), phases)
    labels = balanced_labels(cfg.num_samples, model.num_classes)
    channels, height, width = model.image_shape
    scorer.check(cfg.num_samples, model.image_shape)
    sampler = instantiate(cfg.sampler)
    kept = grid_indices(labels, cfg.grid_columns) if keep == "grid" else torch.arange(len(labels))
    out, psnr = [], SamplesPSNR()
    with ExitStack() as files:
        writer = compared = None
        if compare_to is not None:  # checked first: a mismatch stops the run before anything is written
            compared = files.enter_context(_compared_samples(compare_to, len(labels), model.image_shape))
        if samples is not None:
            writer = files.enter_context(AdmSampleWriter(samples, labels.numpy(), (height, width, channels)))
        seed = stream_seed(cfg.seed, "eval")  # never the noise calibration sampled
        for start, images in clock.each(sampler.batches(model.to(cfg.device), labels, seed=seed), "sampling"):
            check_finite_samples(images, start)  # a NaN would crash the Frechet distance's matrix square root
            with clock("scoring"):
                scorer.update(images, labels[start:start + len(images)])
            with clock("writing"):
                pixels = to_uint8(images).cpu()
                if writer is not None:
                    writer.write(pixels.permute(0, 2, 3, 1).numpy())  # N x H x W x C, as the ADM evaluator reads
                if compared is not None:
                    read, eight_bit = compared  # 8-bit samples are compared with this run's 8-bit samples
                    psnr.update(pixels.float() / 127.5 - 1 if eight_bit else images.cpu(), read(start, len(images)))
                rows = kept[(kept >= start) & (kept < start + len(images))]
                out.append(images[rows - start].float().cpu())
    with clock("scoring"):
        metrics = {"model": model.name, **scorer.compute(seed=cfg.seed)}
    if compare_to is not None:
        metrics["psnr_vs_reference"] = psnr.compute()
    return torch.cat(out), labels[kept], metrics


def check_finite_samples(images: torch.Tensor, start: int) -> None:
    bad = ~torch.isfinite(images.flatten(1)).all(dim=1)
    if bool(bad.any()):
        first = start + int(bad.nonzero()[0])
        raise UserError(f"the model produced non-finite (NaN/Inf) samples ({int(bad.sum())} in samples {start}.."
                        f"{start + len(images) - 1}, first: sample {first}); its weights or sampler settings give "
                        "no finite images, so nothing is scored")


def expected_bytes(cfg: DictConfig) -> int:
    """What eval.py writes at most: the 8-bit samples (samples.npz) and their grid, from the configured model's
    image size (a VAE's: 3 channels at 8x the latent side, as the SD VAE of every ImageNet DiT)."""
    arch, side = cfg.model.arch, cfg.model.arch.sample_size
    pixels = arch.in_channels * side**2 if cfg.model.get("vae") is None else 3 * (8 * side) ** 2
    return 2 * cfg.num_samples * pixels


def evaluate(cfg: DictConfig) -> dict:
    validate(cfg)  # the one schema (also run by eval.py before Hydra starts)
    resolve_device(cfg.device)  # a device this machine lacks stops here, in one line
    out = Path(cfg.paths.output_dir)
    for name in OUTPUTS:  # refuse before minutes of sampling, not after
        fresh(out / name)
    compare_to = _compare_to_path(cfg.get("compare_to"))
    phases: dict[str, float] = {}
    clock = PhaseClock(torch.device(cfg.device), phases)
    with clock("loading"):
        cache = reference_cache(cfg)
        scorer = instantiate(cfg.metric, cache=cache)
        model = load_model(cfg.model, cfg.ckpt, cfg.get("decode", "per_forward"))
    images, labels, metrics = sample_and_score(cfg, model, compare_to, scorer=scorer, samples=out / "samples.npz",
                                               keep="grid", phases=phases)
    metrics = {"ckpt": str(cfg.ckpt), **metrics}
    with clock("writing"):
        write_json(out / "metrics.json", metrics)
        grid = image_grid(images, labels, cfg.grid_columns)
        save_png(out / "samples.png", grid, upscale=cfg.grid_upscale)
        logger = instantiate(cfg.logger)
        for k, v in metrics.items():
            if isinstance(v, float):
                logger.experiment.add_scalar(f"eval/{k}", v, 0)
        logger.experiment.add_image("eval/samples", torch.from_numpy(grid), 0,
                                    dataformats="HW" if grid.ndim == 2 else "HWC")
        logger.finalize("success")
    speed = eval_speed(cfg.num_samples, phases, cache.report)
    write_json(out / "speed.json", speed)
    log.info("metrics: %s", metrics)
    print("\n".join(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}" for k, v in metrics.items()))
    print(speed_lines(speed))
    log.info("speed: %s", speed_lines(speed).replace("\n", "; "))
    return metrics


class PhaseClock:
    """Seconds per phase, added into `phases`; on a GPU each reading first waits for the queued work, so a phase
    counts the work it launched, not the work of the phase before."""

    def __init__(self, device: torch.device, phases: dict[str, float] | None = None):
        self.device, self.phases = device, phases if phases is not None else {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = self._now()
        try:
            yield
        finally:
            self.phases[phase] = self.phases.get(phase, 0.0) + self._now() - start

    def each(self, items: Iterable, phase: str) -> Iterator:
        """`items`, the time spent making each one counted under `phase`."""
        items = iter(items)
        while True:
            with self(phase):
                item = next(items, _END)
            if item is _END:
                return
            yield item

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


_END = object()


def eval_speed(num_samples: int, phases: dict[str, float], reference: list[dict]) -> dict:
    """What speed.json holds: samples per second of sampling and of scoring (scoring's seconds include the real
    images' features: `reference` says whether they were computed or loaded, and in how long), every phase's
    seconds and the CPU threads."""
    rate = lambda phase: round(num_samples / phases[phase], 3) if phases.get(phase) else None  # noqa: E731
    return {"num_samples": num_samples, "threads": torch.get_num_threads(),
            "samples_per_s": {"sampling": rate("sampling"), "scoring": rate("scoring")},
            "seconds": {**{k: round(v, 3) for k, v in phases.items()}, "total": round(sum(phases.values()), 3)},
            "reference_features": [{**r, "seconds": round(r["seconds"], 3)} for r in reference]}


def speed_lines(speed: dict) -> str:
    seconds, rates = speed["seconds"], speed["samples_per_s"]
    reference = "; ".join(f"{r['name']} {r['source']} in {r['seconds']:.2f} s" for r in speed["reference_features"])
    return (f"sampling: {rates['sampling']} samples/s ({seconds['sampling']:.1f} s, {speed['threads']} threads)\n"
            f"scoring: {rates['scoring']} samples/s ({seconds['scoring']:.2f} s; {reference or 'no reference'})\n"
            f"total: {seconds['total']:.1f} s (" + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()
                                                            if k != "total") + ")")


def _compare_to_path(path: str | None) -> Path | None:
    if path is None:
        return None
    if not Path(path).is_file() or Path(path).suffix != ".npz":
        raise UserError(f"compare_to={path} is not an .npz file; give the samples.npz of an earlier eval run")
    return Path(path)


@contextmanager
def _compared_samples(source: torch.Tensor | Path, count: int, image_shape: tuple[int, int, int]
                      ) -> Iterator[tuple[Callable[[int, int], torch.Tensor], bool]]:
    """(read(start, n): the other run's samples start ... start + n - 1 in [-1, 1], whether they are 8-bit),
    after checking that the other run made as many samples of the same shape (same seed: same noise)."""
    channels, height, width = image_shape
    if isinstance(source, torch.Tensor):
        _check_same_samples(tuple(source.shape), (count, channels, height, width), "compare_to")
        yield (lambda start, n: source[start:start + n].float()), False
        return
    with open_npz_array(source, "arr_0") as reader:  # read in order, batch after batch
        _check_same_samples(reader.shape, (count, height, width, channels), f"compare_to={source}")
        yield (lambda _, n: torch.from_numpy(reader.read(n).copy()).permute(0, 3, 1, 2).float() / 127.5 - 1), True


def _check_same_samples(theirs: tuple, ours: tuple, what: str) -> None:
    if theirs != ours:
        raise UserError(f"{what} holds samples of shape {theirs}, these are {ours}: compare runs with the same "
                        "num_samples and model")
