"""In-place skip combinations: the paper's averaging skip and the residual add.

``average_skip_(h, skip)``: h <- (h + skip) / 2, written into ``h`` (the decoder
tensor), never into ``skip``: the skip's producer (a conv, a residual block) may have
saved it for its own backward, and the encoder may still hold it.  Out of place the
average allocates a third activation-sized tensor per decoder block; in place it
allocates nothing, and its backward needs nothing saved (both gradients are g/2).

``residual_add_(h, skip)``: h <- h + skip in place, gradients (g, g).

When writing into ``h`` is safe: ``h`` must not be needed by anyone after this call in
its old value -- in particular its producer must not have saved it for backward.  The
outputs of convolutions, linear layers and :func:`group_norm_silu` are safe (they save
their inputs, not their outputs); the output of e.g. ``torch.sigmoid``/``F.silu`` is not.
PyTorch's version counter turns a violation into an error at backward time
("one of the variables needed for gradient computation has been modified by an
inplace operation"), never into a silently wrong gradient.  ``h`` must not be a leaf
that requires grad.  In the U-Net: the decoder state entering a block is the output
of a residual block or an upsampling conv, and a residual block's output is
``conv_out + shortcut`` with ``conv_out`` freshly produced -- both safe.

Both run the same Triton kernel, ``h = alpha*h + beta*skip`` in fp32 (one rounding);
it moves 3 elements per element of h (read h, read skip, write h): the roofline floor.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch
import triton
import triton.language as tl

from . import composite, cpu_ext
from ._layout import as_layout_of, layout_of
from ._triton import KernelVariant, kernel, launch
from .backends import cpu_implementation

Tensor = torch.Tensor

BLOCK_CUDA = 4096
BLOCK_INTERPRETED = 1024


@kernel
def _skip_combine_kernel(H, SKIP, numel, alpha, beta, BLOCK: tl.constexpr):
    """h <- alpha*h + beta*skip over the flat storage of two identically laid out tensors."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < numel
    h = tl.load(H + offs, mask=m, other=0.0).to(tl.float32)
    s = tl.load(SKIP + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(H + offs, (h * alpha + s * beta).to(H.dtype.element_ty), mask=m)


def skip_combine_(h: Tensor, skip: Tensor, alpha: float, beta: float) -> Tensor:
    """Triton launcher: h <- alpha*h + beta*skip in place (compiled on CUDA, interpreted on CPU).

    ``h`` must be contiguous or channels-last; ``skip`` is copied to h's layout if needed.
    """
    if layout_of(h) is None:
        raise ValueError("skip_combine_: h must be contiguous or channels-last to be written in place")
    skip = as_layout_of(skip, h)
    block = BLOCK_CUDA if h.device.type == "cuda" else BLOCK_INTERPRETED
    launch(_skip_combine_kernel, (triton.cdiv(h.numel(), block),), h.device, h, skip,
           h.numel(), float(alpha), float(beta), num_warps=8, BLOCK=block)
    return h


# --------------------------------------------------------------------------- custom ops
# One schema per op; a kernel per device (CUDA: Triton; CPU: the implementation
# backends.cpu_implementation picks -- for the average the C++ kernel, which registers
# itself for this schema's CPU key, the composite, or the Triton interpreter) and a fake
# kernel.  float64 and layouts the kernel cannot write in place go to the composite.
def _triton_takes(h: Tensor) -> bool:
    return layout_of(h) is not None and h.dtype != torch.float64


def _cpp_takes(h: Tensor) -> bool:
    return h.dtype in (torch.float32, torch.float16, torch.bfloat16)


def _combine_cuda(h: Tensor, skip: Tensor, alpha: float, beta: float, fallback: Callable) -> None:
    if _triton_takes(h):
        skip_combine_(h, skip, alpha, beta)
    else:
        fallback(h, skip)


def _combine_cpu(h: Tensor, skip: Tensor, alpha: float, beta: float, fallback: Callable,
                 cpp: Optional[Callable] = None) -> None:
    impl = cpu_implementation(triton_ok=_triton_takes(h), cpp_ok=cpp is not None and _cpp_takes(h))
    if impl == "triton":
        skip_combine_(h, skip, alpha, beta)
    elif impl == "cpp":
        cpp(h, skip)
    else:
        fallback(h, skip)


@torch.library.custom_op("patchddm::average_skip_", mutates_args=("h",), device_types="cuda")
def average_skip_op(h: Tensor, skip: Tensor) -> None:
    """h <- (h + skip) / 2 in place."""
    _combine_cuda(h, skip, 0.5, 0.5, composite.average_skip_)


@average_skip_op.register_kernel("cpu")
def _average_skip_cpu(h: Tensor, skip: Tensor) -> None:
    _combine_cpu(h, skip, 0.5, 0.5, composite.average_skip_, cpu_ext.average_skip_)


@average_skip_op.register_fake
def _average_skip_fake(h, skip) -> None:
    return None


@torch.library.custom_op("patchddm::residual_add_", mutates_args=("h",), device_types="cuda")
def residual_add_op(h: Tensor, skip: Tensor) -> None:
    """h <- h + skip in place."""
    _combine_cuda(h, skip, 1.0, 1.0, composite.residual_add_)


@residual_add_op.register_kernel("cpu")
def _residual_add_cpu(h: Tensor, skip: Tensor) -> None:
    # No C++ kernel: torch's own in-place add is already one pass.
    _combine_cpu(h, skip, 1.0, 1.0, composite.residual_add_)


@residual_add_op.register_fake
def _residual_add_fake(h, skip) -> None:
    return None


# torch.library.register_autograd takes functional ops only (torch 2.13 raises "Cannot
# register autograd formula for non-functional operator" for a schema that mutates an
# input), and these ops must stay in place: an out-of-place average allocates a third
# activation-sized tensor per decoder block.  So their autograd is one autograd.Function
# around the op, applied by the public functions below.
class _InPlaceCombine(torch.autograd.Function):
    """Autograd of ``op(h, skip)`` writing ``alpha*h + alpha*skip`` into h: nothing saved,
    both gradients ``alpha*g`` (the average: 0.5; the residual add: 1, g itself)."""

    @staticmethod
    def forward(ctx, h: Tensor, skip: Tensor, op: Callable, alpha: float) -> Tensor:
        op(h, skip)
        ctx.mark_dirty(h)
        ctx.alpha = alpha
        return h

    @staticmethod
    def backward(ctx, grad: Tensor):
        g = grad if ctx.alpha == 1.0 else grad * ctx.alpha
        return g, g, None, None


def _check(name: str, h: Tensor, skip: Tensor) -> None:
    if h.shape != skip.shape:
        raise ValueError(f"{name}: h has shape {tuple(h.shape)} but skip has {tuple(skip.shape)}")
    if h.device != skip.device:
        raise ValueError(f"{name}: h is on {h.device} but skip on {skip.device}")
    if not (h.is_floating_point() and skip.is_floating_point()):
        raise TypeError(f"{name}: h and skip must be floating point, got {h.dtype} and {skip.dtype}")


def _apply(name: str, op: Callable, alpha: float, h: Tensor, skip: Tensor) -> Tensor:
    _check(name, h, skip)
    if torch.is_grad_enabled() and (h.requires_grad or skip.requires_grad):
        return _InPlaceCombine.apply(h, skip, op, alpha)
    op(h, skip)
    return h


def average_skip_(h: Tensor, skip: Tensor) -> Tensor:
    """The averaging skip connection in place: ``h <- (h + skip) / 2``; returns ``h``.

    See the module docstring for when writing into ``h`` is safe.
    """
    return _apply("average_skip_", average_skip_op, 0.5, h, skip)


def residual_add_(h: Tensor, skip: Tensor) -> Tensor:
    """The residual connection in place: ``h <- h + skip``; returns ``h``.

    Safe when ``h`` was not saved by its producer (e.g. ``h`` is a conv output); see
    the module docstring.
    """
    return _apply("residual_add_", residual_add_op, 1.0, h, skip)


def aot_variants(dtypes: Sequence[str] = ("fp32", "fp16", "bf16")) -> List[KernelVariant]:
    """The compiled specialisations of the skip kernel (one per activation dtype)."""
    return [KernelVariant(f"skip_combine[{dt}]", _skip_combine_kernel,
                          dict(H=f"*{dt}", SKIP=f"*{dt}", alpha="fp32", beta="fp32"),
                          dict(BLOCK=BLOCK_CUDA), 8, aligned=("numel",))
            for dt in dtypes]
