"""Checking user-supplied values at the boundary, with messages that say where, what and why.

One home for the primitive checks used by the run configuration (:mod:`patchddm_fast.training.config`)
and by command-line flags (argparse ``type=`` adapters).  Every failure is a
:class:`ConfigError` whose one-line message names the source (config file, flag,
checkpoint), the key, the offending value and the expected form, so a CLI can print it
as-is.  The checks are strict on purpose: ``"false"`` is not a boolean and ``3.7`` is not
a step count -- silently coercing either once trained a run that was never asked for.
"""
from __future__ import annotations

import argparse
import math
import re
from typing import Any, Callable, Optional, Sequence

_NUMBER = re.compile(r"\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*")


class ConfigError(ValueError):
    """A setting has the wrong type or lies outside its range; the message names source, key and value."""


def fail(source: str, key: str, value: Any, expected: str) -> ConfigError:
    where = f"{source}: " if source else ""
    return ConfigError(f"{where}config key '{key}' = {value!r}: expected {expected}")


def unknown_key(source: str, key: str, value: Any, valid: Sequence[str]) -> ConfigError:
    where = f"{source}: " if source else ""
    return ConfigError(f"{where}unknown config key '{key}' (value {value!r}); valid keys: {sorted(valid)}")


def _range_text(lo: Optional[float], hi: Optional[float], lo_open: bool = False, hi_open: bool = False) -> str:
    parts = []
    if lo is not None:
        parts.append(f"{'>' if lo_open else '>='} {lo:g}")
    if hi is not None:
        parts.append(f"{'<' if hi_open else '<='} {hi:g}")
    return " and ".join(parts)


def check_int(value: Any, key: str, source: str = "", lo: Optional[int] = None, hi: Optional[int] = None) -> int:
    """An integer (a float only when it is whole, e.g. 100.0) within [lo, hi]; never a bool or a string."""
    expected = "an integer" + (f" {_range_text(lo, hi)}" if lo is not None or hi is not None else "")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise fail(source, key, value, expected)
    if isinstance(value, float):
        if not value.is_integer():
            raise fail(source, key, value, expected + " (a whole number)")
        value = int(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise fail(source, key, value, expected)
    return int(value)


def check_float(value: Any, key: str, source: str = "", lo: Optional[float] = None, hi: Optional[float] = None,
                lo_open: bool = False, hi_open: bool = False) -> float:
    """A finite number within the range.

    A string that spells a number (``"1e-3"``) is accepted because YAML 1.1 (PyYAML) reads
    ``lr: 1e-3`` as a string; any other string (``"fast"``) is an error.
    """
    rng = _range_text(lo, hi, lo_open, hi_open)
    expected = "a finite number" + (f" {rng}" if rng else "")
    v = value
    if isinstance(v, str) and _NUMBER.fullmatch(v):
        v = float(v)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
        raise fail(source, key, value, expected)
    v = float(v)
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise fail(source, key, value, expected)
    if hi is not None and (v > hi or (hi_open and v == hi)):
        raise fail(source, key, value, expected)
    return v


def check_bool(value: Any, key: str, source: str = "") -> bool:
    if not isinstance(value, bool):
        raise fail(source, key, value, "true or false (a boolean, not a string or number)")
    return value


def check_str(value: Any, key: str, source: str = "", nonempty: bool = True) -> str:
    if not isinstance(value, str) or (nonempty and not value.strip()):
        raise fail(source, key, value, "a non-empty string" if nonempty else "a string")
    if any(ord(ch) < 32 for ch in value):
        raise fail(source, key, value, "a string without control characters")
    return value


def check_choice(value: Any, key: str, choices: Sequence[str], source: str = "") -> str:
    if not isinstance(value, str) or value not in choices:
        raise fail(source, key, value, "one of " + ", ".join(repr(c) for c in choices))
    return value


def check_optional(check: Callable[..., Any]) -> Callable[..., Any]:
    """``check`` that also lets None (YAML ``null``) through."""
    def wrapped(value: Any, *args: Any, **kwargs: Any) -> Any:
        return None if value is None else check(value, *args, **kwargs)

    return wrapped


# ----------------------------------------------------------------------------- argparse adapters
def int_at_least(lo: int) -> Callable[[str], int]:
    """argparse ``type=`` for integer flags with a lower bound (``--cases 0`` is an error, not 0 cases)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {text!r}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {text!r}")
        return value

    parse.__name__ = f"integer >= {lo}"
    return parse


def float_in(lo: float, hi: float) -> Callable[[str], float]:
    """argparse ``type=`` for a finite float in [lo, hi]."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number in [{lo:g}, {hi:g}], got {text!r}") from None
        if not (math.isfinite(value) and lo <= value <= hi):
            raise argparse.ArgumentTypeError(f"expected a number in [{lo:g}, {hi:g}], got {text!r}")
        return value

    parse.__name__ = f"number in [{lo:g}, {hi:g}]"
    return parse
