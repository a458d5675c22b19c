"""C++ CPU kernels of the fused ops, compiled on first use and cached.

Why: on CPU the composite PyTorch path of GroupNorm -> SiLU materialises ``x + bias_in``,
the normalised tensor and the activation; ``csrc/patchddm_cpu_ops.cpp`` reads each input
element once for the statistics and once for the output, and its backward recomputes the
activation from ``x`` and the per-group (mean, rstd) instead of saving it.

Build: the single source file is compiled straight with the C++ compiler (``$CXX`` or
``c++``) into a shared library that registers the ops ``torch.ops.patchddm_cpu_ext.*``
with the dispatcher.  No ninja, no pybind11, no Python headers are needed.  The library
is cached under ``$PATCHDDM_FAST_CACHE_DIR`` (default ``$XDG_CACHE_HOME/patchddm_fast`` or
``~/.cache/patchddm_fast``) in a folder named by a hash of the source, the torch version,
the compiler and the SIMD level torch runs with (AVX2/AVX512/default), so a cache shared
between machines never hands one a library built for instructions it lacks.

Nothing is built when :mod:`patchddm_fast` is imported: only the first call of
:func:`available` or of an op builds/loads.  If the build fails (no compiler, unsupported
platform, ...) :func:`available` returns False, a single :class:`RuntimeWarning` says why
and that the composite PyTorch path is used, and the op functions raise
:class:`RuntimeError`.  ``PATCHDDM_FAST_DISABLE_CPP=1`` turns the extension off silently.
"""
from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import torch

__all__ = ["available", "build_info", "gn_silu_forward", "gn_silu_backward", "average_skip_"]

NAMESPACE = "patchddm_cpu_ext"
SOURCE_NAME = "patchddm_cpu_ops.cpp"
_BUILD_TIMEOUT_S = 600

_lock = threading.Lock()
# loaded: None = not tried yet, True/False = outcome; error: reason when False.
_state: dict[str, Any] = {"loaded": None, "error": None, "warned": False, "info": {}}


def _source_path() -> Path:
    """The C++ source: in ``$PATCHDDM_FAST_CSRC`` (a folder) if set, else the repository's
    ``csrc/`` (source checkout, editable install), else ``patchddm_fast/_csrc/`` (where a
    wheel installs ``csrc/``)."""
    folder = os.environ.get("PATCHDDM_FAST_CSRC")
    if folder:
        return Path(folder) / SOURCE_NAME
    package = Path(__file__).resolve().parents[1]
    candidates = [package.parent / "csrc" / SOURCE_NAME, package / "_csrc" / SOURCE_NAME]
    return next((c for c in candidates if c.is_file()), candidates[0])


def _cache_root() -> Path:
    root = os.environ.get("PATCHDDM_FAST_CACHE_DIR")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "patchddm_fast"


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
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if not cxx:
        raise RuntimeError("no C++ compiler found (set $CXX or install g++)")
    return cxx


def _build_command(cxx: str, src: Path, out: Path, simd: list[str]) -> list[str]:
    torch_root = Path(torch.__file__).resolve().parent
    include = torch_root / "include"
    lib = torch_root / "lib"
    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True))
    return [
        cxx, str(src), "-o", str(out),
        "-shared", "-fPIC", "-std=c++20", "-O3", "-fopenmp", "-w",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        *simd,
        f"-I{include}",
        f"-L{lib}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{lib}",
    ]


def _cache_key(cxx: str, src_bytes: bytes, cap: str, flags_probe: list[str]) -> str:
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise RuntimeError(f"C++ compiler {cxx!r} does not run: {exc}") from exc
    h = hashlib.sha256()
    for part in (src_bytes, torch.__version__.encode(), str(Path(torch.__file__).resolve()).encode(),
                 cap.encode(), version.encode(), " ".join(flags_probe).encode(), platform.machine().encode()):
        h.update(part)
        h.update(b"\0")
    return h.hexdigest()[:20]


def _build_and_load() -> dict[str, Any]:
    """Compile (unless cached) and load the library; returns build information."""
    if platform.system() != "Linux":
        raise RuntimeError(f"the C++ CPU extension is built only on Linux, not {platform.system()}")
    src = _source_path()
    if not src.is_file():
        raise RuntimeError(f"C++ source {src} not found (set $PATCHDDM_FAST_CSRC to the csrc folder)")
    src_bytes = src.read_bytes()
    cxx = _compiler()
    cap, simd = _simd_flags()
    probe = _build_command(cxx, Path("SRC"), Path("OUT"), simd)[3:]
    folder = _cache_root() / "cpu_ext" / _cache_key(cxx, src_bytes, cap, probe)
    lib_path = folder / f"{NAMESPACE}.so"
    info: dict[str, Any] = {"library": str(lib_path), "simd": cap, "compiler": cxx, "cached": True,
                            "build_seconds": 0.0}
    if not lib_path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        # compile to a private name, then rename: concurrent processes never load a half-written file
        fd, tmp_name = tempfile.mkstemp(suffix=".so", dir=folder)
        os.close(fd)
        tmp = Path(tmp_name)
        cmd = _build_command(cxx, src, tmp, simd)
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_BUILD_TIMEOUT_S)
        except (OSError, subprocess.SubprocessError) as exc:
            tmp.unlink(missing_ok=True)
            raise RuntimeError(f"running the C++ compiler failed: {exc}") from exc
        if proc.returncode != 0:
            tmp.unlink(missing_ok=True)
            tail = (proc.stderr or proc.stdout or "").strip()[-2000:]
            raise RuntimeError(f"compiling {src} failed (exit {proc.returncode}): {tail}")
        os.replace(tmp, lib_path)
        info.update(cached=False, build_seconds=time.perf_counter() - t0)
    torch.ops.load_library(str(lib_path))
    return info


def available() -> bool:
    """True when the C++ ops are loaded (building them on the first call if needed).

    On failure returns False and warns once per process; later calls return False quietly.
    """
    if _state["loaded"] is not None:
        return bool(_state["loaded"])
    with _lock:
        if _state["loaded"] is None:
            if os.environ.get("PATCHDDM_FAST_DISABLE_CPP", "") not in ("", "0"):
                _state.update(loaded=False, error="disabled by PATCHDDM_FAST_DISABLE_CPP", warned=True)
            else:
                try:
                    _state["info"] = _build_and_load()
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
    """Where the library lies, the SIMD level, whether it came from the cache, build time;
    or the reason it is unavailable (``{"error": ...}``)."""
    if not available():
        return {"error": _state["error"]}
    return dict(_state["info"])


def _ops() -> Any:
    if not available():
        raise RuntimeError(
            f"patchddm_fast C++ CPU extension unavailable ({_state['error']}); "
            "check cpu_ext.available() and use the composite path"
        )
    return getattr(torch.ops, NAMESPACE)


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
    y, mean, rstd = _ops().gn_silu_forward(x, weight, bias, bias_in, int(groups), float(eps))
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
    dx, dw, db, dbin = _ops().gn_silu_backward(dy, x, weight, bias, bias_in, mean, rstd, int(groups))
    return dx, dw, db, (dbin if bias_in is not None else None)


def average_skip_(h: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """h <- (h + skip) / 2 in place, in one pass over dense tensors; returns h."""
    return _ops().average_skip_(h, skip)
