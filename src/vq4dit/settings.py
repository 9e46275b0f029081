"""One definition per setting: a settings dataclass's field is its type, its default, its range and its doc.

A field's annotation gives the type (`int`, `float`, `bool`, `str`, `Literal[...]` for a closed set of strings,
`X | None` where null is allowed, `list[int]`, a nested settings dataclass); `setting(default, low=..., high=...)`
adds what a type cannot say. Everything else is derived from that one place:

- `check_settings(obj, prefix)`, called by the class's `__post_init__`, refuses a bad value of the Python API with
  one line (`method.candidates=0; valid: an integer >= 1`);
- `rules(cls)` and `defaults(cls)` give the CLI its preflight schema and the values a config file need not
  restate (vq4dit/cli/settings_configs.py registers them with Hydra).

Relations between fields (a candidate count against the preset's k) are checked in the class, beside its fields.
"""

import dataclasses
import math
import types
import typing
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any, Literal, Union

from vq4dit.errors import UserError

_RULE = "vq4dit.rule"  # the dataclass field metadata key that holds a setting's bounds


@dataclass(frozen=True)
class Rule:
    """What one value may be. `kind`: int, float, str, bool, path (an existing file or folder), device, devices,
    ints (a list of positive integers) or any; `low`/`high` bound numbers (`low_open`/`high_open` exclude them);
    `choices` for strings; `null`: None allowed."""

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
            elif self.high is not None:
                text += f" {'<' if self.high_open else '<='} {_num(self.high)}"
        else:
            text = {"str": "a string", "bool": "true or false", "path": "an existing file or folder",
                    "device": "cpu, cuda, cuda:<index> or mps, present on this machine",
                    "devices": "a positive number of devices or a list of CUDA indices",
                    "ints": "a list of positive integers", "any": "anything"}[self.kind]
        return text + (" or null" if self.null and self.kind != "any" else "")

    def check(self, key: str, value) -> None:
        if value is None:
            if not (self.null or self.kind == "any"):
                raise UserError(f"{key}=null; valid: {self.valid()}")
            return
        if not self._fits(value):
            raise UserError(f"{key}={show(value)}; valid: {self.valid()}")
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
            return isinstance(value, (list, tuple)) and all(_is_int(v) and v > 0 for v in value)
        if self.kind == "devices":
            return (_is_int(value) and value >= 1) or (isinstance(value, list) and bool(value)
                                                         and all(_is_int(v) and v >= 0 for v in value))
        if not (_is_int(value) if self.kind == "int" else _is_number(value)) or not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)


def setting(default=MISSING, *, default_factory=MISSING, low: float | None = None, high: float | None = None,
            low_open: bool = False, high_open: bool = False, path: bool = False):
    """A dataclass field with the bounds its type cannot say; `path`: a string naming an existing file."""
    bounds = {"low": low, "high": high, "low_open": low_open, "high_open": high_open, "path": path}
    return dataclasses.field(default=default, default_factory=default_factory, metadata={_RULE: bounds})


def is_settings(cls: Any) -> bool:
    """A settings class: a dataclass, whose fields' annotations and `setting` bounds are its schema."""
    return isinstance(cls, type) and dataclasses.is_dataclass(cls)


def setting_fields(cls: type) -> list[dataclasses.Field]:
    """The fields that are settings: every init field but those the class keeps for objects (`Method.quant`)."""
    objects = getattr(cls, "object_fields", ())
    return [f for f in dataclasses.fields(cls) if f.init and f.name not in objects]


def rules(cls: type) -> dict[str, "Rule | type"]:
    """name -> its Rule, or the nested settings class for a field that holds one."""
    hints = typing.get_type_hints(cls, include_extras=False)
    out: dict[str, Rule | type] = {}
    for f in setting_fields(cls):
        annotation = hints[f.name]
        nested = _nested_settings(annotation)
        out[f.name] = nested if nested is not None else _rule(annotation, f.metadata.get(_RULE, {}), cls, f.name)
    return out


def defaults(cls: type) -> dict:
    """name -> default of every setting that has one (nested settings as dicts); what config files need not say."""
    out = {}
    for f in setting_fields(cls):
        if f.default is not MISSING:
            value = f.default
        elif f.default_factory is not MISSING:
            value = f.default_factory()
        else:
            continue
        if dataclasses.is_dataclass(value):
            value = defaults(type(value))
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def check_settings(obj, prefix: str) -> None:
    """Every setting of `obj` against its rule: one UserError line naming `<prefix>.<name>` and what is valid."""
    for name, rule in rules(type(obj)).items():
        value = getattr(obj, name)
        if isinstance(rule, type):  # nested settings check themselves when built
            continue
        rule.check(f"{prefix}.{name}", value)


def nested(cls: type, value, prefix: str):
    """A nested settings field given as a mapping (from a config) as its dataclass; unknown keys are one line."""
    if value is None or isinstance(value, cls):
        return value if value is not None else cls()
    if not isinstance(value, dict):
        raise UserError(f"{prefix}={value}; valid: a mapping of {', '.join(f.name for f in setting_fields(cls))}")
    unknown = [k for k in value if k not in {f.name for f in setting_fields(cls)}]
    if unknown:
        raise UserError(f"{prefix}.{unknown[0]}: no such setting; its settings: "
                        + ", ".join(f.name for f in setting_fields(cls)))
    return cls(**value)


def _nested_settings(annotation) -> type | None:
    return annotation if isinstance(annotation, type) and is_settings(annotation) else None


def _rule(annotation, bounds: dict, cls: type, name: str) -> Rule:
    null = False
    if typing.get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        null = len(args) < len(typing.get_args(annotation))
        if len(args) != 1:
            raise TypeError(f"{cls.__name__}.{name}: a setting has one type (or None), not {annotation}")
        annotation = args[0]
    numbers = {k: bounds[k] for k in ("low", "high", "low_open", "high_open") if bounds.get(k) is not None}
    if typing.get_origin(annotation) is Literal:
        return Rule("str", choices=typing.get_args(annotation), null=null)
    if typing.get_origin(annotation) in (list, tuple) or annotation in (list, tuple):
        return Rule("ints", null=null)
    if annotation is bool:
        return Rule("bool", null=null)
    if annotation is int:
        return Rule("int", **numbers, null=null)
    if annotation is float:
        return Rule("float", **numbers, null=null)
    if annotation in (str, Path):
        return Rule("path" if bounds.get("path") else "str", null=null)
    if annotation is Any:
        return Rule("any")
    raise TypeError(f"{cls.__name__}.{name}: no rule for a setting of type {annotation}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def show(value) -> str:
    return "[" + ", ".join(map(str, value)) + "]" if isinstance(value, (list, tuple)) else str(value)
