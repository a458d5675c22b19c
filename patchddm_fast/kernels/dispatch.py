"""Which implementation runs the custom ops on CPU tensors.

CUDA tensors always run the compiled Triton kernels.  CPU tensors run one of

* ``"cpp"``              -- the C++ extension ``patchddm_fast.kernels.cpu_ext`` (csrc/);
* ``"composite"``        -- the plain-PyTorch composite of :mod:`.reference`;
* ``"triton-interpret"`` -- the *same Triton kernels* as on CUDA, through Triton's
  interpreter (slow: tiny volumes only).  This is how the whole network's forward and
  backward are tested through the real kernel code on a machine without a GPU.
* ``"auto"`` (default)   -- ``"cpp"`` if the extension imports and reports itself
  available, else ``"composite"``.

Selection, first match wins: :func:`set_cpu_backend` / :func:`cpu_backend`; the
environment variable ``PATCHDDM_CPU_BACKEND``; ``PATCHDDM_TRITON_INTERPRET=1`` (or
Triton's own ``TRITON_INTERPRET=1``) meaning ``"triton-interpret"``; ``"auto"``.

About ``TRITON_INTERPRET``: Triton 3.x reads it when ``@triton.jit`` decorates a kernel,
so it normally must be set before the kernels are imported.  This package does not
need it: its kernels keep their source and build the interpreted executable directly
(see :mod:`._triton`), so the routing can be switched at any time in a running
process, and compiled CUDA kernels and interpreted CPU kernels coexist.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from types import ModuleType
from typing import Iterator, Optional

CPU_BACKENDS = ("auto", "cpp", "composite", "triton-interpret")
ENV_BACKEND = "PATCHDDM_CPU_BACKEND"
ENV_INTERPRET = "PATCHDDM_TRITON_INTERPRET"

_selected: Optional[str] = None
_cpu_ext: Optional[ModuleType] = None
_cpu_ext_checked = False


def _check(name: str, source: str) -> str:
    if name not in CPU_BACKENDS:
        raise ValueError(f"{source}: CPU backend must be one of {CPU_BACKENDS}, got {name!r}")
    return name


def set_cpu_backend(name: Optional[str]) -> None:
    """Select the CPU implementation (one of ``CPU_BACKENDS``); None returns to the default."""
    global _selected
    _selected = None if name is None else _check(name, "set_cpu_backend")


def get_cpu_backend() -> str:
    """The selected CPU backend setting (may be ``"auto"``)."""
    if _selected is not None:
        return _selected
    env = os.environ.get(ENV_BACKEND)
    if env:
        return _check(env, f"environment variable {ENV_BACKEND}")
    if os.environ.get(ENV_INTERPRET) == "1" or os.environ.get("TRITON_INTERPRET") == "1":
        return "triton-interpret"
    return "auto"


@contextlib.contextmanager
def cpu_backend(name: str) -> Iterator[None]:
    """Context manager form of :func:`set_cpu_backend` (restores the previous setting)."""
    global _selected
    previous = _selected
    set_cpu_backend(name)
    try:
        yield
    finally:
        _selected = previous


def cpu_ext_module() -> Optional[ModuleType]:
    """The C++ extension module if it imports and reports itself available, else None."""
    global _cpu_ext, _cpu_ext_checked
    if not _cpu_ext_checked:
        _cpu_ext_checked = True
        try:
            from . import cpu_ext  # owned by csrc/; warns itself when it cannot build
        except Exception as exc:  # noqa: BLE001 -- any failure means "not available"
            cpu_ext = None
            if getattr(exc, "name", None) != f"{__package__}.cpu_ext":  # absent: silent
                warnings.warn(f"patchddm_fast.kernels.cpu_ext unavailable ({exc!r}); "
                              "CPU ops use the PyTorch composite", RuntimeWarning, stacklevel=2)
        if cpu_ext is not None and cpu_ext.available():
            _cpu_ext = cpu_ext
    return _cpu_ext


def resolve_cpu_backend() -> str:
    """The CPU backend that will actually run: ``"cpp"``, ``"composite"`` or ``"triton-interpret"``."""
    name = get_cpu_backend()
    if name == "auto":
        return "cpp" if cpu_ext_module() is not None else "composite"
    if name == "cpp" and cpu_ext_module() is None:
        raise RuntimeError("CPU backend 'cpp' was requested but patchddm_fast.kernels.cpu_ext is not "
                           "available (no C++ compiler or build failure); use 'auto' or 'composite'")
    return name
