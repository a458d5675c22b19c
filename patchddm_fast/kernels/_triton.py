"""One Triton kernel source, two executables: compiled (CUDA) and interpreted (CPU).

Triton 3.x decides between compiling and interpreting a kernel when ``@triton.jit``
*decorates* it: ``triton.jit`` reads ``triton.knobs.runtime.interpret`` (the
``TRITON_INTERPRET`` environment variable) at decoration time and returns either a
``JITFunction`` or an ``InterpretedFunction``.  A process therefore normally gets one
or the other for its whole life, fixed by the environment at import time.

This project needs both at once: CUDA tensors must run the compiled kernels, the
ahead-of-time check (``patchddm kernels``) must compile them for sm_80..sm_90 without a
GPU, and CPU tensors must be able to run the *same* kernel source through the
interpreter so the whole network can be tested through the real Triton code.  So the
kernels here are decorated with :func:`kernel`, which keeps the plain Python function
and builds each executable on demand:

* ``k.jit``        -- a ``triton.runtime.jit.JITFunction`` (compiled for CUDA / AOT);
* ``k.interpreted`` -- a ``triton.runtime.interpreter.InterpretedFunction``.

Neither depends on ``TRITON_INTERPRET``, so importing this package never has to mutate
the environment and both kinds coexist in one process.  Kernels may call other
:func:`kernel` functions of the same module as device helpers: every executable gets
its own copy of the module globals in which those helpers are replaced by executables
of the same kind (the interpreter resolves helper names through the kernel's globals,
and so does the compiler's code generator).
"""
from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Sequence, Tuple

import triton.language as tl

# One rewritten globals dict per (module globals, kind): all kernels of a module share it.
_GLOBALS: Dict[Tuple[int, str], Dict[str, Any]] = {}


class DualKernel:
    """A Triton kernel source with lazily built compiled and interpreted executables."""

    def __init__(self, fn: Callable, do_not_specialize: Sequence[str] = ()) -> None:
        self.fn = fn
        self.do_not_specialize = tuple(do_not_specialize)
        self.__name__ = fn.__name__
        self.__doc__ = fn.__doc__
        self._built: Dict[str, Any] = {}

    @property
    def jit(self):
        """The compiled (``JITFunction``) executable, also what AOT compilation takes."""
        return self._variant("jit")

    @property
    def interpreted(self):
        """The interpreter (``InterpretedFunction``) executable, runs on CPU tensors."""
        return self._variant("interpreted")

    def _variant(self, kind: str):
        if kind not in self._built:
            self._build(kind, _namespace(self.fn.__globals__, kind))
        return self._built[kind]

    def _build(self, kind: str, namespace: Dict[str, Any]):
        if kind in self._built:
            return self._built[kind]
        fn = types.FunctionType(self.fn.__code__, namespace, self.fn.__name__,
                                self.fn.__defaults__, self.fn.__closure__)
        fn.__module__ = self.fn.__module__
        fn.__qualname__ = self.fn.__qualname__
        fn.__annotations__ = dict(self.fn.__annotations__)
        fn.__doc__ = self.fn.__doc__
        if kind == "jit":
            from triton.runtime.jit import JITFunction

            built = JITFunction(fn, do_not_specialize=list(self.do_not_specialize))
        else:
            from triton.runtime.interpreter import InterpretedFunction

            built = InterpretedFunction(fn, do_not_specialize=list(self.do_not_specialize))
        self._built[kind] = built
        return built

    def __repr__(self) -> str:
        return f"DualKernel({self.fn.__module__}.{self.__name__})"


def _namespace(module_globals: Dict[str, Any], kind: str) -> Dict[str, Any]:
    """The module globals seen by executables of ``kind``: every DualKernel (this module's
    or imported) replaced by its executable of the same kind.  Registered before it is
    filled, so kernels of one module (and import cycles) share one dict."""
    key = (id(module_globals), kind)
    namespace = _GLOBALS.get(key)
    if namespace is None:
        namespace = _GLOBALS[key] = dict(module_globals)
        for name, value in list(namespace.items()):
            if isinstance(value, DualKernel):
                namespace[name] = value._variant(kind)
    return namespace


def kernel(fn: Callable = None, *, do_not_specialize: Sequence[str] = ()):
    """Decorator replacing ``@triton.jit`` for kernels that must run compiled *and* interpreted."""
    if fn is None:
        return lambda f: DualKernel(f, do_not_specialize)
    return DualKernel(fn, do_not_specialize)


def launch(k: DualKernel, grid: Tuple[int, ...], device, *args, num_warps: int = 4,
           **constexprs) -> None:
    """Run ``k`` on ``grid`` with the executable suited to ``device`` (a torch.device).

    Compile options (``num_warps``, FP fusion) are passed only to the compiled kernel;
    the interpreter ignores them.  FP fusion is requested explicitly (Triton 3.9 warns
    when it is left to its changing default).  CUDA launches go to ``device``'s current
    stream, whatever the current device is.
    """
    if device.type == "cuda":
        import torch

        with torch.cuda.device(device):
            k.jit[grid](*args, num_warps=num_warps, enable_fp_fusion=True, **constexprs)
    else:
        k.interpreted[grid](*args, **constexprs)


# Device helpers.  Triton's own library functions (tl.sum, tl.sigmoid, tl.zeros, tl.cdiv,
# ...) are ``@triton.jit`` functions decorated when triton was imported -- compiled-only
# unless TRITON_INTERPRET was set then -- so the kernels here use builtins and these
# dual helpers instead.  ``sum_`` reduces with ``tl.standard._sum_combine`` exactly like
# ``tl.sum`` (the interpreter recognises that combiner and uses numpy's sum).
@kernel
def sum_(x, axis: tl.constexpr):
    """tl.sum for fp32 tensors, usable compiled and interpreted."""
    return tl.reduce(x, axis, tl.standard._sum_combine)


@kernel
def sigmoid_(x):
    """sigmoid(x) without an overflowing exp: e = exp(-|x|) <= 1 (tl.sigmoid is 1/(1+exp(-x)),
    whose exp overflows to inf for x < -88 -- harmless on GPU, a numpy warning in the
    interpreter, e.g. for masked-out lanes)."""
    e = tl.exp(-tl.abs(x))
    r = 1.0 / (1.0 + e)
    return tl.where(x >= 0, r, e * r)


@dataclass(frozen=True)
class KernelVariant:
    """One compiled specialisation of a kernel, as the launchers produce it on CUDA.

    ``types`` gives the Triton type of pointer and float arguments (``"*fp16"``,
    ``"fp32"``); every other non-constexpr argument is ``"i32"``.  ``aligned`` names the
    integer arguments that are multiples of 16 at the network's shapes (the JIT marks
    those, and all pointers, ``tt.divisibility=16``).
    """

    name: str
    kernel: DualKernel
    types: Mapping[str, str]
    constexprs: Mapping[str, Any]
    num_warps: int
    aligned: Tuple[str, ...] = field(default=())

    def signature(self) -> Dict[str, str]:
        """Argument name -> Triton type string, in argument order (for ``ASTSource``)."""
        sig = {}
        for arg in self.kernel.jit.arg_names:
            sig[arg] = "constexpr" if arg in self.constexprs else self.types.get(arg, "i32")
        return sig

    def attrs(self) -> Dict[Tuple[int, ...], list]:
        """``tt.divisibility`` attributes the JIT would infer (aligned pointers and ints)."""
        out = {}
        for i, (arg, ty) in enumerate(self.signature().items()):
            if ty.startswith("*") or arg in self.aligned:
                out[(i,)] = [["tt.divisibility", 16]]
        return out


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (n >= 1)."""
    return 1 << max(0, int(n) - 1).bit_length()
