"""YAML recipes → validated config trees: `--set` overrides, the strict builder and the `{kind: class}` table.

`load_recipe(path, overrides)` reads YAML with `yaml.safe_load` once, applies `--set a.b.c=value` pairs to the
raw mapping, then builds the dataclasses of the recipe's kind recursively. Unknown keys fail with the closest
valid key; cross-field checks live in `__post_init__` so every way of building a config is validated.
A config saved by an older toolkit (a checkpoint's meta.json) is read with `config_from_saved`, which upgrades it
(`version.upgrade_config`) so it keeps the behaviour it was trained with.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from ..errors import ConfigError
from .ar import ARRunConfig
from .tokenizer import ModelConfig, RunConfig, model_preset
from .version import config_kind, upgrade_config

CONFIG_KINDS: dict[str, type] = {"tokenizer": RunConfig, "ar": ARRunConfig}  # recipe `kind:` → run config class
_WRONG_KIND = {  # load_recipe(expect=...) found the other kind
    "ar": "{path} is a generator recipe (kind: ar): use `mergevq train-ar`",
    "tokenizer": "{path} is a tokenizer recipe: use `mergevq train-tokenizer` (generator recipes say kind: ar)",
}
_EXPECTED = {bool: "true/false", int: "an integer", float: "a number", str: "a string"}

Overrides = list[str] | tuple[str, ...]  # `--set a.b.c=value` pairs


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Turn a YAML value into the annotated type, or raise ConfigError naming the key."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return build_config(tp, value, where)  # type: ignore[arg-type]
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is not type(None):
                try:
                    return _coerce(value, arg, where)
                except ConfigError as e:
                    errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}={value!r}: must be one of {', '.join(map(str, args))}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            args = (args[0],) * len(value)
        elif len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp in _EXPECTED:
        if tp is int and isinstance(value, float) and value.is_integer():
            return int(value)
        kinds = (int, float) if tp is float else tp
        if isinstance(value, bool) != (tp is bool) or not isinstance(value, kinds):
            raise ConfigError(f"{where}: expected {_EXPECTED[tp]}, got {value!r}")
        return float(value) if tp is float else value
    raise ConfigError(f"{where}: unsupported type {getattr(tp, '__name__', None) or str(tp).replace('typing.', '')}")


def build_config(cls: type, data: dict[str, Any], where: str = "", *, base: Any = None) -> Any:
    """Build the dataclass `cls` from a mapping; fields the mapping omits come from `base` (a preset) or the
    defaults. `where` is the dotted prefix error messages name keys with."""
    if cls is ModelConfig and base is None:
        base = model_preset(data.get("name", ModelConfig().name), f"{where}.name" if where else "name")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    kwargs = {} if base is None else {name: getattr(base, name) for name in names}
    for key, value in data.items():
        full = f"{where}.{key}" if where else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean {(where + '.' if where else '') + close[0]!r}?" if close else ""
            raise ConfigError(f"unknown key {full!r}{hint} (valid: {', '.join(names)})")
        sub_base = getattr(base, key) if base is not None else None
        if dataclasses.is_dataclass(hints[key]) and sub_base is not None and isinstance(value, dict):
            kwargs[key] = build_config(hints[key], value, full, base=sub_base)
        else:
            kwargs[key] = _coerce(value, hints[key], full)
    try:
        return cls(**kwargs)
    except TypeError as e:  # only reachable through programming errors: kw_only dataclasses take every field
        raise ConfigError(f"{where or 'config'}: {e}") from None




def parse_override(pair: str) -> tuple[list[str], Any]:
    """`a.b.c=value` → (["a","b","c"], value parsed as YAML, so 4 → int, [1,2] → list, null → None)."""
    if "=" not in pair:
        raise ConfigError(f"--set {pair!r}: expected key=value, e.g. model.decoder.depth=4")
    key, raw = pair.split("=", 1)
    keys = [k for k in key.strip().split(".") if k]
    if not keys:
        raise ConfigError(f"--set {pair!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):  # YAML 1.1 reads 3e-3 (no dot) as a string
        try:
            value = float(value) if value.strip().lower() not in ("nan", "inf", "-inf", "infinity") else value
        except ValueError:
            pass
    return keys, value


def apply_overrides(data: dict[str, Any], overrides: Overrides) -> dict[str, Any]:
    """Set dotted keys in a raw (pre-dataclass) mapping; unknown keys are caught later by the strict build."""
    for pair in overrides:
        keys, value = parse_override(pair)
        node = data
        for k in keys[:-1]:
            child = node.get(k)
            if child is None:
                child = node[k] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {pair!r}: {k!r} is not a section")
            node = child
        node[keys[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"recipe not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"{p}: malformed YAML{at}: {getattr(e, 'problem', None) or e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: cannot read recipe: {e}") from None
    if data is None:
        raise ConfigError(f"{p}: the recipe is empty")
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: a recipe must be a YAML mapping, got {type(data).__name__}")
    return data


def recipe_kind(data: dict[str, Any], where: str | Path) -> str:
    kind = data.get("kind", "tokenizer")
    if kind not in CONFIG_KINDS:
        raise ConfigError(f"{where}: kind={kind!r}: must be {' or '.join(CONFIG_KINDS)}")
    return kind


@typing.overload
def config_from_dict(data: dict[str, Any], where: str = "", kind: None = None) -> RunConfig: ...


@typing.overload
def config_from_dict(data: dict[str, Any], where: str = "", *, kind: Literal["ar"]) -> ARRunConfig: ...


def config_from_dict(data: dict[str, Any], where: str = "", kind: str | None = None) -> Any:
    """A run config from a plain mapping written now (a recipe, `config_to_dict` output): an ARRunConfig when
    `kind` or the mapping's own kind is "ar", else a RunConfig (which rejects any other kind). A mapping without
    `version` is current; one with an older `version` is upgraded. Use `config_from_saved` for a config read
    from a checkpoint or run folder."""
    cls = ARRunConfig if config_kind(data, kind) == "ar" else RunConfig
    return build_config(cls, upgrade_config(data, kind, saved=False), where)


@typing.overload
def config_from_saved(data: dict[str, Any], where: str = "", kind: None = None) -> RunConfig: ...


@typing.overload
def config_from_saved(data: dict[str, Any], where: str = "", *, kind: Literal["ar"]) -> ARRunConfig: ...


def config_from_saved(data: dict[str, Any], where: str = "", kind: str | None = None) -> Any:
    """`config_from_dict` for a config a checkpoint or run folder saved: a mapping without `version` was
    written before config versions existed (version 1) and is upgraded to build a model that behaves as it did."""
    cls = ARRunConfig if config_kind(data, kind) == "ar" else RunConfig
    return build_config(cls, upgrade_config(data, kind, saved=True), where)


def load_recipe(path: str | Path, overrides: Overrides = (), expect: str | None = None) -> Any:
    """Read a recipe once, apply `--set` overrides and build the config class of its kind (tokenizer unless it
    says `kind: ar`). With `expect`, a recipe of the other kind is refused with the command that trains it."""
    if expect is not None and expect not in CONFIG_KINDS:
        raise ValueError(f"expect={expect!r}: must be one of {', '.join(CONFIG_KINDS)}")
    data = apply_overrides(read_yaml(path), overrides)
    kind = recipe_kind(data, path)
    if expect is not None and kind != expect:
        raise ConfigError(_WRONG_KIND[kind].format(path=path))
    try:
        cfg = build_config(CONFIG_KINDS[kind], upgrade_config(data, kind, saved=False))
        _refuse_unread(cfg)
        return cfg
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def _refuse_unread(cfg: Any) -> None:
    """A recipe value the chosen settings would silently ignore is an error naming both (checked for recipes
    only: a saved config loads as it was trained)."""
    data = getattr(cfg, "data", None)
    if data is None or getattr(data, "source", "imagefolder") == "imagefolder":
        return
    for name in ("root", "val_root"):
        if getattr(data, name, None) is not None:
            raise ConfigError(f"data.{name} is set but data.source is {data.source}, which does not read it: "
                              f"add --set data.source=imagefolder to train on the folder")


def load_config(path: str | Path, overrides: Overrides = ()) -> RunConfig:
    """Read a tokenizer recipe, apply `--set` overrides and build the validated config tree."""
    return load_recipe(path, overrides, expect="tokenizer")


def load_ar_config(path: str | Path, overrides: Overrides = ()) -> ARRunConfig:
    """Read a generator recipe (kind: ar)."""
    return load_recipe(path, overrides, expect="ar")


def load_any_config(path: str | Path, overrides: Overrides = ()) -> RunConfig | ARRunConfig:
    """A tokenizer (kind: tokenizer, the default) or generator (kind: ar) recipe with `--set` overrides."""
    return load_recipe(path, overrides)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) for YAML/JSON output and checkpoints."""

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        return v

    return conv(cfg)
