"""Config versions: a saved config keeps the behaviour it was trained with when a later toolkit changes defaults.

Version 2 settled the departures from the paper and the public release (see the README): it added keys whose new
default differs from what version 1 did, and it started to apply `loss.disc_weight`, which version 1 stored but
never used. A run config carries `version`; a config saved before that key existed (a checkpoint's meta.json, a
run's config.json) is version 1. `upgrade_config` turns an older dict into a current one that behaves as before:
every key version 2 added gets the value version 1 had, and `loss.disc_weight` becomes 1.0. A recipe without
`version` is current; a recipe may say `version: 1` to get version 1's behaviour.
"""

from __future__ import annotations

import copy
from typing import Any

from ..errors import ConfigError

CONFIG_VERSION = 2

# kind -> [(dotted key, value version 1 had, replace a stored value?)] for the step from version 1 to 2
_V1_TO_V2: dict[str, list[tuple[str, Any, bool]]] = {
    "tokenizer": [
        ("model.norm_eps", 1e-6, False),
        ("model.decoder.adagn_unbiased", False, False),
        ("model.init_scheme", "all-trunc-normal", False),
        ("loss.disc_weight", 1.0, True),  # stored (0.8 in the paper recipes) but never applied before version 2
    ],
    "ar": [],  # generators: the new keys' defaults are version 1's behaviour
}


def config_kind(data: dict[str, Any], kind: str | None = None) -> str:
    """`ar` for a generator config (by `kind` or the mapping's own `kind`), else `tokenizer`."""
    return "ar" if (kind or data.get("kind")) == "ar" else "tokenizer"


def config_version(data: dict[str, Any], saved: bool) -> int:
    """The version of a raw config: its `version`, else 1 for a saved config and the current one for a recipe."""
    v = data.get("version")
    if v is None:
        return 1 if saved else CONFIG_VERSION
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= CONFIG_VERSION:
        raise ConfigError(f"version={v!r}: this toolkit reads config versions 1..{CONFIG_VERSION}")
    return v


def upgrade_config(data: dict[str, Any], kind: str | None = None, *, saved: bool = True) -> dict[str, Any]:
    """A copy of the raw config `data` at CONFIG_VERSION that behaves as `data` did (see the module docstring).
    `saved`: a mapping without `version` was written by a toolkit before versions existed (version 1); with
    `saved=False` (a recipe) it is current and comes back unchanged."""
    version = config_version(data, saved)
    out = copy.deepcopy(data)
    if version < 2:
        for key, value, replace in _V1_TO_V2[config_kind(data, kind)]:
            *sections, name = key.split(".")
            node = out
            for s in sections:
                child = node.get(s)
                if not isinstance(child, dict):
                    child = node[s] = {}
                node = child
            if replace or name not in node:
                node[name] = value
    out["version"] = CONFIG_VERSION
    return out
