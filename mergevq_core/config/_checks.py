"""The two validation helpers every config's `__post_init__` uses."""

from __future__ import annotations

from ..errors import ConfigError


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _one_of(value: str, name: str, choices: tuple[str, ...]) -> None:
    _check(value in choices, f"{name}={value!r}: choose one of {', '.join(choices)}")
