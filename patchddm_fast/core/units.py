"""Memory sizes as people write them and read them: ``parse_bytes("8GB")`` and ``fmt_bytes``.

One home for both directions, below everything that takes a size (the run config's
``memory_budget``, the planner, the reports).  GB is decimal (10^9), GiB binary (2^30).
"""
from __future__ import annotations

import re
from typing import Union

_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}


def parse_bytes(value: Union[str, int, float]) -> int:
    """'8GB' -> 8e9, '8GiB' -> 8*2^30, '512MB', 1e9 -> bytes.  GB is decimal (10^9)."""
    if isinstance(value, (int, float)):
        if value <= 0:
            raise ValueError(f"memory size must be positive, got {value}")
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read memory size {value!r}; write e.g. 8GB, 8GiB or 512MB")
    n = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if n <= 0:
        raise ValueError(f"memory size must be positive, got {value!r}")
    return int(n)


def fmt_bytes(n: float) -> str:
    """Human-readable decimal units (B, kB, MB, GB)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"
