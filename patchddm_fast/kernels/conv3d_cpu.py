"""3D convolution on the CPU with oneDNN in both directions.

PyTorch's CPU convolution picks oneDNN only where its heuristic expects it to win; for a
batch of one whose ``N * C * D * H`` is at most 20,480 (e.g. 16 channels at 32^3 -- the
demo's and any small patch's shapes) it takes the im2col ``slow_conv3d`` path, whose
forward is 3-25x and whose backward 8-16x slower than oneDNN's direct convolution in the
same build (BENCHMARKS.md).  The forward here always calls oneDNN.  oneDNN's backward is not
exposed to Python, but both gradients of a convolution *are* convolutions, so where PyTorch
would take the slow path the backward runs them through the fast forward kernel (elsewhere
``convolution_backward`` already runs oneDNN's own backward, which is faster than these
reformulations at large shapes):

* grad input: the output gradient, zero-dilated by the stride (and zero-padded by the
  rounding remainder of the forward), convolved with the spatially flipped, in/out-swapped
  weight at padding k - 1 - p;
* grad weight: the input with batch and channel swapped, convolved with the output
  gradient (batch and channel swapped) as the kernel, dilated by the stride;
* grad bias: the output gradient summed over batch and space.

Saved tensors are those of ``F.conv3d`` (input and weight), so memory accounting is
unchanged.  Only groups = 1 and dilation = 1 (the network's convolutions) take this path.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

_ONE = [1, 1, 1]
# Below this many input elements either path takes microseconds; PyTorch's is kept.
SMALL_NUMEL = 1 << 15


def onednn_usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """fp32 CPU tensors with oneDNN available and enabled (``torch.backends.mkldnn``), outside
    CPU autocast (which must see ``F.conv3d`` to run it in its lower precision)."""
    return (
        x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
        and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
        and not torch.is_autocast_enabled("cpu")
    )


def _conv(x: torch.Tensor, w: torch.Tensor, padding: Sequence[int], dilation: Sequence[int] = _ONE) -> torch.Tensor:
    """Stride-1 oneDNN convolution without bias."""
    return torch.ops.aten.mkldnn_convolution(x.contiguous(), w.contiguous(), None, list(padding), _ONE, list(dilation), 1)


def grad_input(grad: torch.Tensor, weight: torch.Tensor, input_shape: Sequence[int], stride: Sequence[int],
               padding: Sequence[int]) -> torch.Tensor:
    """d(conv3d(x, w))/dx applied to ``grad``, as one forward convolution."""
    k = weight.shape[2:]
    if any(s != 1 for s in stride):
        n, c = grad.shape[:2]
        dilated = grad.new_zeros((n, c, *[(o - 1) * s + 1 for o, s in zip(grad.shape[2:], stride)]))
        dilated[:, :, ::stride[0], ::stride[1], ::stride[2]] = grad
        grad = dilated
    # Rows of x the forward never reached (the stride's rounding remainder) get zero gradient.
    remainder = [d + 2 * p - kk - (o - 1) * s
                 for d, p, kk, o, s in zip(input_shape[2:], padding, k, grad.shape[2:], [1, 1, 1])]
    if any(remainder):
        grad = F.pad(grad, [0, remainder[2], 0, remainder[1], 0, remainder[0]])
    flipped = weight.flip(2, 3, 4).transpose(0, 1)
    return _conv(grad, flipped, [kk - 1 - p for kk, p in zip(k, padding)])


def grad_weight(grad: torch.Tensor, x: torch.Tensor, kernel: Sequence[int], stride: Sequence[int],
                padding: Sequence[int]) -> torch.Tensor:
    """d(conv3d(x, w))/dw applied to ``grad``, as one forward convolution (batch as channels)."""
    out = _conv(x.transpose(0, 1), grad.transpose(0, 1), padding, dilation=stride)  # (Cin, Cout, k', ...)
    return out[:, :, : kernel[0], : kernel[1], : kernel[2]].transpose(0, 1)


def aten_takes_slow_path(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """PyTorch's own test (``ConvParams::use_mkldnn``, fp32 CPU, groups 1) for *not* using
    oneDNN: a single sample, kernel at most 3 wide, and N * C * D * H <= 20,480."""
    n, c, d, h = x.shape[:4]
    return n == 1 and weight.shape[-1] <= 3 and weight.shape[-2] <= 3 and n * c * d * h <= 20480


def pytorch_conv3d_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride: Sequence[int],
                            padding: Sequence[int], need_x: bool, need_w: bool, need_b: bool,
                            dilation: Sequence[int] = _ONE, groups: int = 1):
    """PyTorch's own ``convolution_backward`` of a conv3d: (grad_x, grad_weight, grad_bias)."""
    return torch.ops.aten.convolution_backward(
        grad, x, weight, [weight.shape[0]] if need_b else None, list(stride), list(padding), list(dilation), False,
        [0, 0, 0], groups, [need_x, need_w, need_b])


def conv3d_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride: Sequence[int],
                    padding: Sequence[int], need_x: bool, need_w: bool, need_b: bool):
    """(grad_x, grad_weight, grad_bias) of a bias-carrying conv3d, each None where not needed."""
    if not aten_takes_slow_path(x, weight) or x.numel() < SMALL_NUMEL:
        return pytorch_conv3d_backward(grad, x, weight, stride, padding, need_x, need_w, need_b)
    grad = grad.contiguous()
    dx = grad_input(grad, weight, x.shape, stride, padding) if need_x else None
    dw = grad_weight(grad, x, weight.shape[2:], stride, padding) if need_w else None
    db = grad.sum((0, 2, 3, 4)) if need_b else None
    return dx, dw, db


class OneDnnConv3d(torch.autograd.Function):
    """conv3d(x, w, b, stride, padding) with every pass on oneDNN's forward kernel."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride: List[int], padding: List[int]):
        ctx.save_for_backward(x, weight)
        ctx.conf = (list(stride), list(padding), bias is not None)
        return torch.ops.aten.mkldnn_convolution(x, weight, bias, list(padding), list(stride), _ONE, 1)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        stride, padding, has_bias = ctx.conf
        need = ctx.needs_input_grad
        return (*conv3d_backward(grad, x, weight, stride, padding, need[0], need[1], has_bias and need[2]), None, None)


def conv3d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: Sequence[int],
           padding: Sequence[int]) -> torch.Tensor:
    """oneDNN conv3d (groups 1, dilation 1) with autograd; callers check :func:`onednn_usable`."""
    return OneDnnConv3d.apply(x, weight, bias, list(stride), list(padding))
