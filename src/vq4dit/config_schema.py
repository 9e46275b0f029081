"""One schema for every value of the composed configs of train.py, eval.py and export.py: type and range.

`validate(cfg)` walks every leaf of a composed config (the `hydra` node apart) and checks it against the first rule
whose pattern matches its dotted key; a leaf that no rule matches is refused too, so an option added to a config
file without its rule here stops every run that has it (and tests/test_reliability.py, which composes every
option of every group). A failure is one `UserError` line naming the key, the value and what is valid. The
settings' relations (a preset's family, k against a layer's size, d against its width) stay with the classes that
know them (presets, methods), which check them before any work too.
"""

import fnmatch
import math
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from vq4dit.errors import UserError


@dataclass(frozen=True)
class Rule:
    """What one value may be. `kind`: int, float, str, bool, path (an existing file or folder), device, devices,
    ints (a list of integers) or any; `low`/`high` bound numbers (`low_open`/`high_open` exclude them); `choices` for
    strings; `null`: None allowed."""

    kind: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple = ()
    null: bool = False

    def valid(self) -> str:
        if self.choices:
            text = ", ".join(map(str, self.choices))
        elif self.kind in ("int", "float"):
            text = {"int": "an integer", "float": "a number"}[self.kind]
            lo, hi = "([" [not self.low_open], ")]" [not self.high_open]
            if self.low is not None and self.high is not None:
                text += f" in {lo}{_num(self.low)}, {_num(self.high)}{hi}"
            elif self.low is not None:
                text += f" {'>' if self.low_open else '>='} {_num(self.low)}"
        else:
            text = {"str": "a string", "bool": "true or false", "path": "an existing file or folder",
                    "device": "cpu, cuda, cuda:<index> or mps, present on this machine",
                    "devices": "a positive number of devices or a list of CUDA indices",
                    "ints": "a list of positive integers", "any": "anything"}[self.kind]
        return text + (" or null" if self.null else "")

    def check(self, key: str, value) -> None:
        if value is None:
            if not self.null:
                raise UserError(f"{key}=null; valid: {self.valid()}")
            return
        if not self._fits(value):
            raise UserError(f"{key}={_show(value)}; valid: {self.valid()}")
        if self.kind == "path" and not Path(value).exists():
            raise UserError(f"{key}={value} does not exist; valid: {self.valid()}")
        if self.kind == "device":
            from vq4dit.devices import resolve_device  # imports torch: only for configs that name a device

            resolve_device(value, key)

    def _fits(self, value) -> bool:
        if self.kind == "any":
            return True
        if self.kind in ("str", "path", "device"):
            return isinstance(value, str) and (not self.choices or value in self.choices)
        if self.kind == "bool":
            return isinstance(value, bool)
        if self.kind == "ints":
            return isinstance(value, list) and all(_is_int(v) and v > 0 for v in value)
        if self.kind == "devices":
            return (_is_int(value) and value >= 1) or (isinstance(value, list) and bool(value)
                                                         and all(_is_int(v) and v >= 0 for v in value))
        if not (_is_int(value) if self.kind == "int" else _is_number(value)) or not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _show(value) -> str:
    return "[" + ", ".join(map(str, value)) + "]" if isinstance(value, list) else str(value)


def Int(low=None, high=None, null=False) -> Rule:  # noqa: N802 (reads as a type in the table)
    return Rule("int", low, high, null=null)


def Num(low=None, high=None, low_open=False, high_open=False, null=False) -> Rule:  # noqa: N802
    return Rule("float", low, high, low_open, high_open, null=null)


def Choice(*choices, null=False) -> Rule:  # noqa: N802
    return Rule("str", choices=choices, null=null)


STR, BOOL, ANY, DEVICE = Rule("str"), Rule("bool"), Rule("any"), Rule("device")
PRECISIONS = ("fp32", "bf16", "fp16")
POSITIVE, RATE, FRACTION = Int(1), Num(0, low_open=True), Num(0, 1, low_open=True)  # FRACTION: (0, 1]

# The first matching pattern wins. Keys are dotted paths of the composed config (rule_for).
RULES: dict[str, Rule] = {
    # every job
    "task_name": STR, "seed": Int(0), "device": DEVICE, "paths.*": STR,
    "threads": Int(1, null=True),  # torch CPU threads of the job (null: torch's default)
    # train.py
    "devices": Rule("devices"), "precision": Choice(*PRECISIONS), "dry_run": BOOL, "resume": BOOL,
    "log_samples": Int(0),
    "estimate.tflops": Num(0, low_open=True, null=True), "estimate.tbps": Num(0, low_open=True, null=True),
    "estimate.steps": POSITIVE,
    # eval.py / export.py
    "ckpt": Rule("path"), "out": STR, "num_samples": Int(2), "grid_columns": POSITIVE, "grid_upscale": POSITIVE,
    "compare_to": Rule("path", null=True), "decode": Choice("per_forward", "once"),
    # model
    "**._target_": STR, "**._partial_": BOOL,
    "model.name": STR, "model.weights": Rule("path", null=True), "model.vae": Rule("path", null=True),
    "model.seed": Int(0), "model.timestep_shift": Num(), "model.guided_channels": Int(1, null=True),
    "model.latent_scale": RATE, "model.arch.norm_eps": RATE,
    "model.arch.*": POSITIVE,
    # quantization presets
    "quant.name": STR, "quant.k": Int(2), "quant.d": POSITIVE, "quant.bits": Int(2, 8),
    "quant.group_size": Int(1, null=True), "quant.symmetric": BOOL,
    # methods (every method's settings; a method's config holds only its own)
    "method.candidates": POSITIVE, "method.ratio_init": Choice("uniform", "inverse_distance"),
    "method.codebook_training": Choice("joint", "after_freeze"), "method.regularizer": Choice("paper", "code"),
    "method.reg_weight": Num(0), "method.reg_schedule": Choice("constant", "linear"),
    "method.freeze_threshold": FRACTION,
    "method.freeze_every": POSITIVE, "method.harden_at": FRACTION,
    "method.lr_ratios": RATE, "method.kmeans_iters": POSITIVE, "method.kmeans_points_per_codeword": POSITIVE,
    "method.kmeans_weighting": Choice("none", "input_moment"), "method.moment_damp": Num(0),
    "method.damp": Num(0), "method.block_size": POSITIVE, "method.act_order": BOOL,
    "method.balance": BOOL, "method.lr_rounding": RATE, "method.lr_act_scale": RATE, "method.beta_start": RATE,
    "method.beta_end": RATE, "method.warmup": Num(0, 1, high_open=True),
    "method.group_sizes": Rule("path", null=True), "method.space": Rule("ints"), "method.base_group_size": POSITIVE,
    "method.reference_width": POSITIVE, "method.budget": Choice("bitops", "mean_group_size"),
    "method.search.generations": POSITIVE, "method.search.population": POSITIVE, "method.search.select": POSITIVE,
    "method.search.mutations": Int(0), "method.search.crossovers": Int(0), "method.search.mutation_prob": Num(0, 1),
    "method.search.score": Choice("psnr", "fid", "hidden_mse"), "method.search.samples": Int(2),
    # activation presets
    "act.name": STR, "act.bits": Int(2, 16, null=True),
    "act.granularity": Choice("tensor", "token", "token_group", null=True), "act.group_size": Int(1, null=True),
    "act.dynamic": Rule("bool", null=True), "act.symmetric": BOOL, "act.attention": BOOL,
    # fitting
    "fit.iterations": POSITIVE, "fit.batch_size": POSITIVE, "fit.lr": RATE, "fit.rmsprop_alpha": Num(0, 1, low_open=True, high_open=True),
    "fit.log_every": POSITIVE,
    "model_fit.iterations": Int(0, null=True), "model_fit.batch_size": POSITIVE, "model_fit.lr": RATE,
    "model_fit.rmsprop_alpha": Num(0, 1, low_open=True, high_open=True), "model_fit.log_every": POSITIVE,
    # the calibration pool
    "pool.trajectories": Int(1, null=True), "pool.size": POSITIVE, "pool.heldout_trajectories": POSITIVE,
    "pool.heldout_size": POSITIVE, "pool.student_inputs": Choice("fp", "quantized", null=True),
    # the sampler and its diffusers scheduler
    "sampler.steps": POSITIVE, "sampler.guidance_scale": Num(1), "sampler.batch_size": POSITIVE,
    "sampler.device": DEVICE, "sampler.precision": Choice(*PRECISIONS),
    "sampler.scheduler.num_train_timesteps": POSITIVE, "sampler.scheduler.beta_schedule": STR,
    "sampler.scheduler.beta_start": FRACTION, "sampler.scheduler.beta_end": FRACTION,
    "sampler.scheduler.clip_sample": BOOL, "sampler.scheduler.variance_type": STR,
    "sampler.scheduler.timestep_spacing": Choice("linspace", "leading", "trailing"),
    # the Lightning Trainer of a block's fit, the logger
    "trainer.log_every_n_steps": POSITIVE, "trainer.enable_model_summary": BOOL, "trainer.enable_progress_bar": BOOL,
    "trainer.deterministic": BOOL,
    "logger.save_dir": STR, "logger.name": STR, "logger.version": STR, "logger.default_hp_metric": BOOL,
    # metrics
    "metric.classifier": Rule("path"), "metric.reference_fraction": Num(0, 1, low_open=True, high_open=True), "metric.device": DEVICE,
    "metric.batch_size": POSITIVE, "metric.inception_weights": Rule("path"), "metric.reference": Rule("path"),
    "metric.sample_counts": Rule("ints", null=True), "metric.split_size": POSITIVE, "metric.neighbours": POSITIVE,
    "metric.feature_network": ANY,  # tests put a stand-in network's config here
}


def rule_for(key: str) -> Rule | None:
    """`**.name` matches `name` at any depth; otherwise `*` stays within one level."""
    for pattern, rule in RULES.items():
        if pattern.startswith("**.") and (key == pattern[3:] or key.endswith(pattern[2:])):
            return rule
        if fnmatch.fnmatchcase(key, pattern) and pattern.count(".") == key.count("."):
            return rule
    return None


def validate(cfg: DictConfig, skip: tuple[str, ...] = ("hydra",)) -> None:
    """Every leaf of `cfg` against its rule; one UserError line for the first bad or unknown value."""
    for key, value in leaves(cfg, skip):
        rule = rule_for(key)
        if rule is None:
            raise UserError(f"{key}={_show(value)} is not a setting this project knows (no rule in "
                            "vq4dit/config_schema.py); remove it or add its rule")
        rule.check(key, value)


def leaves(cfg: DictConfig, skip: tuple[str, ...] = ()):
    """(dotted key, resolved value) of every leaf, a level's own values before its groups' (`ckpt` before the
    `model.weights` that interpolates it); lists are leaves. A required value (???) not given, or an
    interpolation that does not resolve, is one UserError line."""
    for key in sorted(cfg.keys(), key=lambda k: OmegaConf.is_dict(cfg._get_node(k))):
        if key in skip:
            continue
        if OmegaConf.is_missing(cfg, key):
            raise UserError(f"{_full(cfg, key)} is not set (???); give {_full(cfg, key)}=<value>")
        try:
            node = cfg[key]
        except OmegaConfBaseException as e:
            raise UserError(f"{_full(cfg, key)}: {str(e).splitlines()[0]}") from None
        if isinstance(node, DictConfig):
            if node._is_none():
                yield _full(cfg, key), None
            else:
                yield from leaves(node)
        elif isinstance(node, ListConfig):
            yield _full(cfg, key), OmegaConf.to_container(node, resolve=True)
        else:
            yield _full(cfg, key), node


def _full(cfg: DictConfig, key) -> str:
    parent = cfg._get_full_key(None) if cfg._get_parent() is not None else ""
    return f"{parent}.{key}" if parent else str(key)
