"""The C++ CPU implementation of the custom ops: built on first use, then called directly.

Why: on CPU the composite PyTorch path of GroupNorm -> SiLU materialises ``x + bias_in``,
the normalised tensor and the activation; ``csrc/patchddm_cpu_ops.cpp`` reads each input
element once for the statistics and once for the output, and its backward recomputes the
activation from ``x`` and the per-group (mean, rstd) instead of saving it.

Build: :func:`torch.utils.cpp_extension.load` compiles the single source file with ninja
and loads it as a plain shared library (no pybind11 module).  The library has no schemas
of its own: ``TORCH_LIBRARY_IMPL(patchddm, CPU, m)`` registers its kernels for the CPU key
of the ops ``patchddm::gn_silu_fwd``, ``gn_silu_bwd`` and ``average_skip_`` that
:mod:`.gn_silu` and :mod:`.average_skip` define.  The build directory is torch's
(``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions/py3X_cpu``), where ninja
rebuilds when the source, the flags or torch's headers change; the extension's name
carries the SIMD level torch runs with (AVX2/AVX512/default, compiled like ATen's own
kernels via ``CPU_CAPABILITY``, not ``-march=native``), so a build directory shared
between machines never hands one a library built for instructions it lacks.

Loading puts the C++ kernels in front of each op's Python CPU implementation (the
selector of :mod:`.backends`, which must keep choosing between C++, the composite and the
Triton interpreter).  :func:`_load` therefore takes each C++ kernel out with
:func:`torch.library.get_kernel` and registers the Python implementation in front again
-- the pattern ``get_kernel``'s documentation describes ("register another kernel to the
same dispatch key that calls into the original kernel for certain cases").

Nothing is built when :mod:`patchddm_fast` is imported: only the first call of
:func:`available` or of an op builds/loads.  If the build fails (no compiler, no ninja,
unsupported platform, ...) :func:`available` returns False, a single
:class:`RuntimeWarning` says why and that the composite PyTorch path is used, and the op
functions raise :class:`RuntimeError`.  ``PATCHDDM_DISABLE_CPP=1`` turns the extension
off silently; ``$PATCHDDM_CSRC`` names another folder holding the source.
"""
from __future__ import annotations

import contextlib
import os
import platform
import shutil
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

import torch
import torch.utils.cpp_extension

__all__ = ["available", "build_info", "gn_silu_forward", "gn_silu_backward", "average_skip_"]

NAMESPACE = "patchddm"
# The ops whose CPU key the library registers (csrc/patchddm_cpu_ops.cpp, TORCH_LIBRARY_IMPL).
OPS = ("gn_silu_fwd", "gn_silu_bwd", "average_skip_")
SOURCE_NAME = "patchddm_cpu_ops.cpp"
ENV_SOURCE = "PATCHDDM_CSRC"
ENV_DISABLE = "PATCHDDM_DISABLE_CPP"
_CPU_KEYS = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)

_lock = threading.Lock()
# loaded: None = not tried yet, True/False = outcome; error: reason when False.
_state: dict[str, Any] = {"loaded": None, "error": None, "warned": False, "info": {}}
_kernels: Dict[str, Any] = {}  # op name -> the C++ kernel (torch._C._SafeKernelFunction)
_front: list = []  # the torch.library.Library objects keeping the Python CPU kernels in front


def _source_path() -> Path:
    """The C++ source: in ``$PATCHDDM_CSRC`` (a folder) if set, else the repository's
    ``csrc/`` (source checkout, editable install), else ``patchddm_fast/_csrc/`` (where a
    wheel installs ``csrc/``)."""
    folder = os.environ.get(ENV_SOURCE)
    if folder:
        return Path(folder) / SOURCE_NAME
    package = Path(__file__).resolve().parents[1]
    candidates = [package.parent / "csrc" / SOURCE_NAME, package / "_csrc" / SOURCE_NAME]
    return next((c for c in candidates if c.is_file()), candidates[0])


def _simd_flags() -> tuple[str, list[str]]:
    """Compiler flags for the SIMD level torch itself dispatches to on this CPU.

    Mirrors how ATen builds its own CPU kernels (``CPU_CAPABILITY`` picks the
    at::vec::Vectorized implementation), instead of ``-march=native``.
    """
    cap = torch.backends.cpu.get_cpu_capability() if platform.machine() in ("x86_64", "AMD64") else "DEFAULT"
    if cap == "AVX512":
        return cap, ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512",
                     "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"]
    if cap == "AVX2":
        return cap, ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"]
    return "DEFAULT", ["-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"]


def _compiler() -> str:
    """The compiler cpp_extension will run (``$CXX`` or ``c++``), checked up front so that a
    missing one gives a one-line reason instead of a ninja log."""
    cxx = os.environ.get("CXX", "c++")
    if not shutil.which(cxx):
        raise RuntimeError(f"no C++ compiler found ({cxx!r}; set $CXX or install g++)")
    return cxx


@contextlib.contextmanager
def _ninja_on_path() -> Iterator[None]:
    """cpp_extension runs ``ninja`` from $PATH; the ``ninja`` wheel (install_requires) puts
    its binary next to the interpreter, which is not on $PATH when a virtual environment
    is used without activating it.  Adds that folder for the duration of the build."""
    path = os.environ.get("PATH", "")
    extra = None
    if shutil.which("ninja") is None:
        try:
            import ninja  # optional here: without it, load() fails with torch's clear message
            extra = ninja.BIN_DIR
        except ImportError:
            pass
    if extra:
        os.environ["PATH"] = extra + os.pathsep + path
    try:
        yield
    finally:
        if extra:
            os.environ["PATH"] = path


def _build_and_load() -> dict[str, Any]:
    """Compile (unless ninja finds it up to date) and load the library; returns build information."""
    if platform.system() != "Linux":
        raise RuntimeError(f"the C++ CPU extension is built only on Linux, not {platform.system()}")
    src = _source_path()
    if not src.is_file():
        raise RuntimeError(f"C++ source {src} not found (set ${ENV_SOURCE} to the csrc folder)")
    cxx = _compiler()
    cap, simd = _simd_flags()
    name = f"patchddm_cpu_ops_{cap.lower()}"
    t0 = time.perf_counter()
    with _ninja_on_path():
        library = torch.utils.cpp_extension.load(
            name=name, sources=[str(src)], is_python_module=False, verbose=False,
            extra_cflags=["-O3", "-fopenmp", "-w", *simd], extra_ldflags=["-fopenmp"])
    return {"library": str(library), "simd": cap, "compiler": cxx,
            "build_seconds": time.perf_counter() - t0}


def _load() -> dict[str, Any]:
    """Build and load the library, take its kernels out, and put the Python CPU kernels back in front."""
    if not hasattr(torch.library, "get_kernel"):
        raise RuntimeError(f"torch {torch.__version__} lacks torch.library.get_kernel (torch >= 2.9)")
    qualified = [f"{NAMESPACE}::{op}" for op in OPS]
    python_kernels = {op: torch.library.get_kernel(q, "CPU") for op, q in zip(OPS, qualified)}
    info = _build_and_load()
    lib = torch.library.Library(NAMESPACE, "IMPL")
    for op, q in zip(OPS, qualified):
        _kernels[op] = torch.library.get_kernel(q, "CPU")
        lib.impl(op, python_kernels[op].call_boxed, "CPU", with_keyset=True)
    _front.append(lib)
    return info


def available() -> bool:
    """True when the C++ kernels are loaded (building them on the first call if needed).

    On failure returns False and warns once per process; later calls return False quietly.
    """
    if _state["loaded"] is not None:
        return bool(_state["loaded"])
    with _lock:
        if _state["loaded"] is None:
            if os.environ.get(ENV_DISABLE, "") not in ("", "0"):
                _state.update(loaded=False, error=f"disabled by {ENV_DISABLE}", warned=True)
            else:
                try:
                    _state["info"] = _load()
                    _state["loaded"] = True
                except Exception as exc:  # any failure means: use the composite path
                    _state.update(loaded=False, error=str(exc))
            if not _state["loaded"] and not _state["warned"]:
                _state["warned"] = True
                warnings.warn(
                    "patchddm_fast: the C++ CPU extension is unavailable "
                    f"({_state['error']}); using the composite PyTorch implementation on CPU.",
                    RuntimeWarning,
                    stacklevel=2,
                )
    return bool(_state["loaded"])


def build_info() -> dict[str, Any]:
    """Where the library lies, the SIMD level, the compiler and the load time (build included);
    or the reason it is unavailable (``{"error": ...}``)."""
    if not available():
        return {"error": _state["error"]}
    return dict(_state["info"])


def _kernel(op: str) -> Any:
    if not available():
        raise RuntimeError(
            f"patchddm_fast C++ CPU extension unavailable ({_state['error']}); "
            "check cpu_ext.available() and use the composite path"
        )
    return _kernels[op]


def gn_silu_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    bias_in: Optional[torch.Tensor],
    groups: int,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y = SiLU(GroupNorm(x + bias_in[:, :, None, None, None])) and the per-group stats.

    x: (N, C, D, H, W) float32/float16/bfloat16, contiguous or channels_last_3d (other
    layouts are made contiguous).  weight, bias: (C,); bias_in: (N, C) or None.
    Returns y (x's dtype and layout), mean and rstd (float32, (N, groups)).
    """
    y, mean, rstd = _kernel("gn_silu_fwd").call_boxed(_CPU_KEYS, x, weight, bias, bias_in,
                                                      int(groups), float(eps))
    return y, mean, rstd


def gn_silu_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    bias_in: Optional[torch.Tensor],
    mean: torch.Tensor,
    rstd: torch.Tensor,
    groups: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Gradients of :func:`gn_silu_forward` from x and the saved (mean, rstd).

    Returns dx (x's dtype and layout), dweight, dbias (weight's/bias's dtype) and
    dbias_in ((N, C), bias_in's dtype; None when bias_in is None).
    """
    dx, dw, db, dbin = _kernel("gn_silu_bwd").call_boxed(_CPU_KEYS, dy, x, weight, bias, bias_in,
                                                         mean, rstd, int(groups))
    return dx, dw, db, (dbin if bias_in is not None else None)


def average_skip_(h: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """h <- (h + skip) / 2 in place, in one pass over dense tensors; returns h."""
    _kernel("average_skip_").call_boxed(_CPU_KEYS, h, skip)
    return h
