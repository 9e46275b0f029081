"""One schema for every value of the composed configs of train.py, eval.py and export.py: type and range.

A node whose `_target_` names a settings class (a dataclass: a method, a preset, `FitSettings`...) is checked
against that class's own fields (vq4dit/settings.py): its keys are the class's settings, its types and ranges the
fields'. Nothing about a method's settings is written here. The job's own values (device, paths, sampler, the
Lightning Trainer...) are checked by the first rule of `RULES` whose pattern matches the dotted key; a leaf that
nothing matches is refused, so an option added to a config file without its rule stops every run that has it.
A failure is one `UserError` line naming the key, the value and what is valid.
"""

import fnmatch

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from vq4dit.cli.settings_configs import CLASS_CHECKED, SETTINGS_GROUPS, settings_class
from vq4dit.errors import UserError
from vq4dit.settings import Rule, is_settings, rules, setting_fields, show

CONFIG_KEYS = ("_target_", "_partial_", "_convert_", "_recursive_")  # Hydra's own keys in a settings node


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
    "compare_to": Rule("path", null=True), "decode": Choice("per_forward", "once"), "reference_cache": BOOL,
    "pipeline": BOOL,  # export.py: a pipeline folder
    # model
    "**._target_": STR, "**._partial_": BOOL,
    "model.name": STR, "model.weights": Rule("path", null=True), "model.vae": Rule("path", null=True),
    "model.seed": Int(0), "model.timestep_shift": Num(), "model.guided_channels": Int(1, null=True),
    "model.latent_scale": RATE, "model.arch.norm_eps": RATE,
    "model.arch.*": POSITIVE,
    # the sampler and its diffusers scheduler
    "sampler.steps": POSITIVE, "sampler.guidance_scale": Num(1), "sampler.batch_size": POSITIVE,
    "sampler.device": DEVICE, "sampler.precision": Choice(*PRECISIONS),
    "sampler.scheduler.num_train_timesteps": POSITIVE,
    "sampler.scheduler.beta_schedule": Choice("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"),
    "sampler.scheduler.beta_start": FRACTION, "sampler.scheduler.beta_end": FRACTION,
    "sampler.scheduler.clip_sample": BOOL,
    "sampler.scheduler.variance_type": Choice("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log",
                                              "learned", "learned_range"),
    "sampler.scheduler.timestep_spacing": Choice("linspace", "leading", "trailing"),
    # the Lightning Trainer of a block's fit, the logger
    "trainer.log_every_n_steps": POSITIVE, "trainer.enable_model_summary": BOOL, "trainer.enable_progress_bar": BOOL,
    "trainer.deterministic": BOOL,
    "logger.save_dir": STR, "logger.name": STR, "logger.version": STR, "logger.default_hp_metric": BOOL,
    # metrics
    "metric.classifier": Rule("path"), "metric.reference_fraction": Num(0, 1, low_open=True, high_open=True),
    "metric.device": DEVICE,
    "metric.batch_size": POSITIVE, "metric.inception_weights": Rule("path"), "metric.reference": Rule("path"),
    "metric.sample_counts": Rule("ints", null=True), "metric.split_size": POSITIVE, "metric.neighbours": POSITIVE,
    "metric.feature_network": ANY,  # null: the Inception network; tests put a stand-in network's config here
}


def rule_for(key: str) -> Rule | None:
    """`**.name` matches `name` at any depth; otherwise `*` stays within one level."""
    for pattern, rule in RULES.items():
        if pattern.startswith("**.") and (key == pattern[3:] or key.endswith(pattern[2:])):
            return rule
        if fnmatch.fnmatchcase(key, pattern) and pattern.count(".") == key.count("."):
            return rule
    return None


# A dry run reads no weights; with an assumed throughput (estimate.tflops) it counts for a device it need not have.
DRY_RUN_UNREAD = ("model.weights", "model.vae")


def validate(cfg: DictConfig, skip: tuple[str, ...] = ("hydra",)) -> None:
    """Every leaf of `cfg` against its rule; one UserError line for the first bad or unknown value."""
    dry = bool(cfg.get("dry_run"))
    elsewhere = dry and OmegaConf.select(cfg, "estimate.tflops", default=None) is not None
    classes = {key: _settings_node(cfg, key) for key in cfg.keys() if key not in skip}
    settings = {key: cls for key, cls in classes.items() if cls is not None}
    for key, value in leaves(cfg, skip + tuple(settings), unread=DRY_RUN_UNREAD if dry else ()):
        rule = rule_for(key)
        if rule is None:
            raise UserError(f"{key}={show(value)} is not a setting this project knows (no rule in "
                            "vq4dit/cli/config_schema.py); remove it or add its rule")
        if elsewhere and rule.kind == "device":
            rule = Rule("str")  # the device is named, not used: the estimate counts for it
        if not (dry and key in DRY_RUN_UNREAD):
            rule.check(key, value)
    for key in sorted(settings):
        check_settings_node(str(key), cfg[key], settings[key])
    check_relations(cfg, check_devices=not elsewhere)


def check_relations(cfg: DictConfig, check_devices: bool = True) -> None:
    """Values that are valid alone but not together (checked once every value is)."""
    if check_devices and cfg.get("devices") is not None and cfg.get("device") is not None:
        from vq4dit.devices import resolve_devices  # a count this machine cannot give, before any work

        resolve_devices(cfg.device, cfg.devices if isinstance(cfg.devices, int) else list(cfg.devices))
    model = cfg.get("model")
    if model is not None and model.get("guided_channels") is not None and "arch" in model:
        channels = model.arch.get("in_channels")
        if channels is not None and model.guided_channels > channels:
            raise UserError(f"model.guided_channels={model.guided_channels} exceeds the model's "
                            f"{channels} input channels; valid: 1..{channels} or null (every channel)")
    scheduler = OmegaConf.select(cfg, "sampler.scheduler", default=None)
    if scheduler is not None and scheduler.get("beta_start") is not None and scheduler.get("beta_end") is not None \
            and scheduler.beta_start >= scheduler.beta_end:
        raise UserError(f"sampler.scheduler.beta_start={scheduler.beta_start} >= beta_end={scheduler.beta_end}; "
                        "valid: beta_start < beta_end")


def check_settings_node(prefix: str, node: DictConfig, cls: type) -> None:
    """`node`'s keys are settings of `cls` and each value fits its field (a nested settings class recursively)."""
    known = rules(cls)
    for name in node.keys():
        if name in CONFIG_KEYS:
            continue
        key = f"{prefix}.{name}"
        value = _value(node, name, key)
        rule = known.get(name)
        if rule is None:
            owner = OmegaConf.select(node, "_target_", default=None) or cls.__name__
            names = ", ".join(f.name for f in setting_fields(cls)) or "none"
            raise UserError(f"{key}={show(value)}: {owner} has no setting {name}; its settings: {names}")
        if isinstance(rule, type):  # a nested settings class: its own keys
            if not isinstance(node[name], DictConfig):
                raise UserError(f"{key}={show(value)}; valid: a mapping of "
                                + ", ".join(f.name for f in setting_fields(rule)))
            check_settings_node(key, node[name], rule)
        else:
            rule.check(key, value)


def _value(node: DictConfig, name: str, key: str):
    if OmegaConf.is_missing(node, name):
        raise UserError(f"{key} is not set (???); give {key}=<value>")
    try:
        value = node[name]
    except OmegaConfBaseException as e:
        raise UserError(f"{key}: {str(e).splitlines()[0]}") from None
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def _settings_node(cfg: DictConfig, key) -> type | None:
    """The settings class a top-level node is checked against: the dataclass its `_target_` names. A settings
    group whose `_target_` does not import is one line."""
    node = cfg._get_node(key)
    if key not in CLASS_CHECKED or not OmegaConf.is_dict(node) or node._is_none() or "_target_" not in node:
        return None
    target = node.get("_target_")
    cls = settings_class(target)
    if cls is None and key in SETTINGS_GROUPS:
        raise UserError(f"{key}._target_={target} names no class that imports; valid: a settings class such as "
                        f"vq4dit.methods.VQ4DiT (configs/{key}/)")
    return cls if is_settings(cls) else None


def leaves(cfg: DictConfig, skip: tuple[str, ...] = (), unread: tuple[str, ...] = ()):
    """(dotted key, resolved value) of every leaf, a level's own values before its groups' (`ckpt` before the
    `model.weights` that interpolates it); lists are leaves. A required value (???) not given, or an
    interpolation that does not resolve, is one UserError line (those in `unread` are left out)."""
    for key in sorted(cfg.keys(), key=lambda k: OmegaConf.is_dict(cfg._get_node(k))):
        if key in skip:
            continue
        if OmegaConf.is_missing(cfg, key):
            if _full(cfg, key) in unread:
                continue
            raise UserError(f"{_full(cfg, key)} is not set (???); give {_full(cfg, key)}=<value>")
        try:
            node = cfg[key]
        except OmegaConfBaseException as e:
            raise UserError(f"{_full(cfg, key)}: {str(e).splitlines()[0]}") from None
        if isinstance(node, DictConfig):
            if node._is_none():
                yield _full(cfg, key), None
            else:
                yield from leaves(node, unread=unread)
        elif isinstance(node, ListConfig):
            yield _full(cfg, key), OmegaConf.to_container(node, resolve=True)
        else:
            yield _full(cfg, key), node


def _full(cfg: DictConfig, key) -> str:
    parent = cfg._get_full_key(None) if cfg._get_parent() is not None else ""
    return f"{parent}.{key}" if parent else str(key)
