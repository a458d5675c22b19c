"""Memory layouts the kernels address directly, and allocation that preserves them.

The kernels see an (N, C, *spatial) tensor as (N, C, S) with S = prod(spatial) and
address element (n, c, s) either as

* ``"cf"`` (channels first, ``torch.contiguous_format``): ``n*C*S + c*S + s``, or
* ``"cl"`` (channels last, ``torch.channels_last`` / ``channels_last_3d``): ``n*S*C + s*C + c``.

Every implementation (Triton, C++, composite) and every fake implementation allocates
its outputs through :func:`empty_in_layout`, so the real and fake ops produce tensors
with identical shapes, dtypes and strides -- which the memory simulator and
``torch.library.opcheck`` both rely on.  A tensor in neither layout is copied to
``"cf"`` first (a temporary).
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch

_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def layout_of(x: torch.Tensor) -> Optional[str]:
    """``"cf"``, ``"cl"`` or None (neither).  A tensor in both (C == 1 or S == 1) is "cf":
    both formulas then give the same address for every element."""
    if x.is_contiguous():
        return "cf"
    fmt = _CHANNELS_LAST.get(x.dim())
    if fmt is not None and x.is_contiguous(memory_format=fmt):
        return "cl"
    return None


def memory_format(layout: str, dim: int) -> torch.memory_format:
    """The torch memory format of ``layout`` for a ``dim``-dimensional tensor."""
    return _CHANNELS_LAST[dim] if layout == "cl" else torch.contiguous_format


def in_kernel_layout(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself if the kernels can address it, else a "cf" copy."""
    return x if layout_of(x) is not None else x.contiguous()


def empty_in_layout(x: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """An uninitialised tensor with ``x``'s shape in the layout the kernels write for ``x``."""
    fmt = memory_format(layout_of(x) or "cf", x.dim())
    return torch.empty(x.shape, dtype=dtype or x.dtype, device=x.device, memory_format=fmt)


def as_layout_of(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``t`` addressed like ``ref`` (which must be in a kernel layout); copies only if needed."""
    ref_layout = layout_of(ref)
    if ref_layout is None:
        raise ValueError("as_layout_of: the reference tensor is in no kernel layout")
    if layout_of(t) == ref_layout:
        return t
    return t.contiguous(memory_format=memory_format(ref_layout, ref.dim()))


_poison = False


@contextlib.contextmanager
def poisoned_outputs() -> Iterator[None]:
    """Testing aid: while active, the Triton launchers fill every tensor they allocate
    (outputs and partial sums) with NaN before the kernels run, so an element a kernel
    fails to write shows up as NaN instead of as plausible leftover memory."""
    global _poison
    previous, _poison = _poison, True
    try:
        yield
    finally:
        _poison = previous


def fresh(t: torch.Tensor) -> torch.Tensor:
    """``t`` (just allocated by a launcher), NaN-filled inside :func:`poisoned_outputs`."""
    if _poison and t.is_floating_point():
        t.fill_(float("nan"))
    return t
