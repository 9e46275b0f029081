"""The config files of a settings group say only `_target_` and deliberate overrides; the defaults come from the
settings class (vq4dit/settings.py) through Hydra's ConfigStore.

For every option `<group>/<option>.yaml` of a group in `SETTINGS_GROUPS`, the defaults of the class its
`_target_` names are stored as `settings/<group>/<option>`. The primary configs put
`- settings/<group>@<group>: ${<group>}` before the group in their defaults list, so the class's defaults come
first, the option file's own values override them, and a command-line override of any setting finds its key.
A new method is one module and one YAML: nothing here names a method.
"""

from pathlib import Path

from omegaconf import OmegaConf

SETTINGS_GROUPS = ("method", "fit", "model_fit", "pool")  # the groups whose options are settings classes
CLASS_CHECKED = (*SETTINGS_GROUPS, "quant", "act")  # checked against their class (presets state every value)


def register_settings(config_dir: Path) -> None:
    """Store the class defaults of every option of every settings group (a `_target_` that does not import is
    stored empty: the preflight names it in one line)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for group in SETTINGS_GROUPS:
        for option in sorted((Path(config_dir) / group).glob("*.yaml")):
            store.store(group=f"settings/{group}", name=option.stem, node=_defaults_of(option))


def _defaults_of(option: Path) -> dict:
    from vq4dit.settings import defaults, is_settings

    try:
        target = OmegaConf.load(option).get("_target_")
    except Exception:  # an unreadable file: Hydra's own composition reports it
        return {}
    cls = settings_class(target)
    return defaults(cls) if is_settings(cls) else {}


def settings_class(target) -> type | None:
    """The class a `_target_` names, or None if it names none that imports (or names a function)."""
    import importlib

    if not isinstance(target, str) or "." not in target:
        return None
    module, _, name = target.rpartition(".")
    try:
        found = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None
    return found if isinstance(found, type) else None
