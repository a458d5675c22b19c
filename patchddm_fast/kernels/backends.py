"""Which implementation the CPU kernel of each custom op runs.

Every op has one schema and one kernel per device (see :mod:`.gn_silu`,
:mod:`.average_skip`).  CUDA tensors run the compiled Triton kernels.  The CPU kernel
runs one of

* ``"cpp"``              -- the C++ kernels of csrc/ (:mod:`.cpu_ext`);
* ``"composite"``        -- the plain-PyTorch composite of :mod:`.composite`;
* ``"triton-interpret"`` -- the *same Triton kernels* as on CUDA, through Triton's
  interpreter (slow: tiny volumes only).  This is how the whole network's forward and
  backward are tested through the real kernel code on a machine without a GPU.
* ``"auto"`` (default)   -- ``"cpp"`` if the extension builds/loads, else ``"composite"``.

Selection, first match wins: :func:`set_cpu_backend` / :func:`cpu_backend`; the
environment variable ``PATCHDDM_CPU_BACKEND``; ``PATCHDDM_TRITON_INTERPRET=1`` (or
Triton's own ``TRITON_INTERPRET=1``) meaning ``"triton-interpret"``; ``"auto"``.
Inputs an implementation cannot take (float64 everywhere; channel counts beyond the
Triton register tile; layouts a kernel cannot write in place) go to the composite, as
:func:`cpu_implementation` decides.

About ``TRITON_INTERPRET``: Triton 3.x reads it when ``@triton.jit`` decorates a kernel,
so it normally must be set before the kernels are imported.  This package does not
need it: its kernels keep their source and build the interpreted executable directly
(see :mod:`._triton`), so the setting can be switched at any time in a running
process, and compiled CUDA kernels and interpreted CPU kernels coexist.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional

from . import cpu_ext

CPU_BACKENDS = ("auto", "cpp", "composite", "triton-interpret")
ENV_BACKEND = "PATCHDDM_CPU_BACKEND"
ENV_INTERPRET = "PATCHDDM_TRITON_INTERPRET"

# The user's choice (None: the environment decides).  A process-wide setting like
# torch.backends.*: it selects the implementation, the op's schema stays the same.
_selected: Optional[str] = None


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


def resolve_cpu_backend() -> str:
    """The CPU backend that will actually run: ``"cpp"``, ``"composite"`` or ``"triton-interpret"``."""
    name = get_cpu_backend()
    if name == "auto":
        return "cpp" if cpu_ext.available() else "composite"
    if name == "cpp" and not cpu_ext.available():
        raise RuntimeError("CPU backend 'cpp' was requested but patchddm_fast.kernels.cpu_ext is not "
                           "available (no C++ compiler or build failure); use 'auto' or 'composite'")
    return name


def cpu_implementation(triton_ok: bool, cpp_ok: bool) -> str:
    """``"triton"``, ``"cpp"`` or ``"composite"``: what a CPU kernel runs for inputs that the
    Triton kernels (``triton_ok``) and the C++ kernels (``cpp_ok``) can or cannot take.

    Inputs neither takes go to the composite without resolving the setting (so they never
    trigger the C++ build)."""
    if not (triton_ok or cpp_ok):
        return "composite"
    backend = resolve_cpu_backend()
    if backend == "triton-interpret" and triton_ok:
        return "triton"
    if backend == "cpp" and cpp_ok:
        return "cpp"
    return "composite"
