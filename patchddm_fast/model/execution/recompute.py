"""Recompute the cheap parts, keep what matters: the U-Net's checkpointing building blocks.

In the paper's residual block the tensors autograd keeps are dominated by the *inputs of
convolutions* -- the GroupNorm-SiLU output (and, with the reference ops, the fp32 copies
GroupNorm and SiLU save) and, for the upsampling conv, the nearest-upsampled tensor.  Those
are cheap to recompute (a few memory passes) while the convolutions are expensive.

* :func:`prep_conv` runs ``y = conv(prep(*inputs))`` as one autograd node that saves only
  ``inputs``.  Backward recomputes ``prep`` (GroupNorm-SiLU, or the upsampling), runs the
  convolution's backward directly -- the convolution is *never* recomputed -- and
  back-propagates through the recomputed ``prep``.  ("selective" checkpointing.)
* :func:`block_conv2` runs a residual block's ``conv2(SiLU(GN2(conv1(SiLU(GN1(x))) + b)))``
  saving only ``x`` and the time bias ``b``; backward recomputes ``conv1`` (never ``conv2``)
  in two stages so at most four activation-sized tensors exist at once.  ("block".)

Memory discipline in backward: a recomputed activation ``a`` is only needed as the input of
the convolution's backward; the GroupNorm-SiLU backward needs ``x`` and the statistics, not
``a``.  After the convolution backward, ``a``'s storage is therefore swapped for a 1-element
stub (:func:`_release`) -- autograd needs only its graph node and shape to back-propagate.

Gradients equal the plain graph's (same kernels, same order).  Mixed precision: autocast
would run the convolution in its lower-precision dtype; these nodes do the same cast
explicitly (input and weight to ``torch.get_autocast_dtype``) with autocast disabled inside,
so forward numerics equal the plain path's.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from patchddm_fast.kernels import conv3d_cpu as cpu_conv
from patchddm_fast.model import backend


def _conv_dtype(device_type: str, like: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return like.dtype


def conv_as_module(conv: nn.Conv3d, a: torch.Tensor, dtype: torch.dtype, padding=None) -> torch.Tensor:
    """``conv`` applied to ``a`` in ``dtype`` (autocast's cast, done explicitly), through the
    same convolution backend the module's forward uses (:func:`patchddm_fast.model.backend.conv3d`)."""
    w = conv.weight.to(dtype)
    b = conv.bias.to(dtype) if conv.bias is not None else None
    padding = conv.padding if padding is None else padding
    with torch.autocast(a.device.type, enabled=False):
        if conv.groups == 1 and conv.dilation == (1, 1, 1):
            return backend.conv3d(getattr(conv, "ops", "reference"), a.to(dtype), w, b, conv.stride, padding)
        return F.conv3d(a.to(dtype), w, b, conv.stride, padding, conv.dilation, conv.groups)


_conv = conv_as_module


def _conv_backward(conv: nn.Conv3d, grad_y: torch.Tensor, a: torch.Tensor, dtype: torch.dtype,
                   need_a: bool, need_w: bool, need_b: bool):
    """(grad_a, grad_weight, grad_bias) of ``conv`` at input ``a``; parameter grads in their dtype."""
    w = conv.weight.to(dtype)
    has_b = conv.bias is not None
    if conv.groups == 1 and conv.dilation == (1, 1, 1):
        grad_a, grad_w, grad_b = backend.conv3d_backward(
            getattr(conv, "ops", "reference"), grad_y.to(dtype), a.to(dtype), w, has_b, conv.stride, conv.padding,
            need_a, need_w, need_b)
    else:
        grad_a, grad_w, grad_b = cpu_conv.pytorch_conv3d_backward(
            grad_y.to(dtype), a.to(dtype), w, conv.stride, conv.padding, need_a, need_w, need_b and has_b,
            dilation=conv.dilation, groups=conv.groups)
    grad_w = grad_w.to(conv.weight.dtype) if grad_w is not None else None
    grad_b = grad_b.to(conv.bias.dtype) if grad_b is not None else None
    return grad_a, grad_w, grad_b


def _release(t: torch.Tensor) -> None:
    """Free ``t``'s memory but keep it usable as the root of ``torch.autograd.grad``."""
    t.data = torch.empty((), dtype=t.dtype, device=t.device).expand(t.shape)


def _detach_inputs(tensors: Sequence[Optional[torch.Tensor]], needs: Sequence[bool]) -> List[Optional[torch.Tensor]]:
    return [t.detach().requires_grad_(bool(need) and t.is_floating_point()) if t is not None else None
            for t, need in zip(tensors, needs)]


def _grads_through(a: torch.Tensor, grad_a: torch.Tensor, wrt: Sequence[Optional[torch.Tensor]],
                   needs: Sequence[bool]) -> List[Optional[torch.Tensor]]:
    """Gradients of ``a`` w.r.t. each entry of ``wrt`` whose ``needs`` is set (None elsewhere)."""
    picked = [t for t, need in zip(wrt, needs) if t is not None and need and t.requires_grad]
    grads = iter(torch.autograd.grad(a, picked, grad_a.to(a.dtype)) if picked and a.requires_grad else ())
    return [next(grads) if t is not None and need and t.requires_grad else None for t, need in zip(wrt, needs)]


class _PrepConv(torch.autograd.Function):
    """y = conv(prep(*inputs)); saves ``inputs`` only (see module docstring)."""

    @staticmethod
    def forward(ctx, prep, conv, n_inputs, prep_params, *tensors):  # type: ignore[override]
        inputs = tensors[:n_inputs]
        a = prep(*inputs)
        ctx.dtype = _conv_dtype(inputs[0].device.type, a)
        y = _conv(conv, a, ctx.dtype)
        ctx.prep, ctx.conv, ctx.n_inputs, ctx.prep_params = prep, conv, n_inputs, prep_params
        ctx.save_for_backward(*inputs)
        return y

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        conv: nn.Conv3d = ctx.conv
        n, k = ctx.n_inputs, len(ctx.prep_params)
        needs = ctx.needs_input_grad[4:]
        with torch.enable_grad():
            inputs = _detach_inputs(ctx.saved_tensors, needs[:n])
            a = ctx.prep(*inputs)
        grad_a, grad_w, grad_b = _conv_backward(conv, grad_y, a, ctx.dtype, a.requires_grad, needs[n + k], needs[-1])
        _release(a)
        grads = _grads_through(a, grad_a, list(inputs) + list(ctx.prep_params), needs[:n + k])
        del a, grad_a
        out = grads + [grad_w] + ([grad_b] if conv.bias is not None else [])
        return (None, None, None, None, *out)


def prep_conv(prep: Callable[..., torch.Tensor], conv: nn.Conv3d, inputs: Sequence[Optional[torch.Tensor]],
              prep_params: Sequence[torch.Tensor] = ()) -> torch.Tensor:
    """``conv(prep(*inputs))`` saving only ``inputs`` for backward.

    ``prep_params`` are the parameters ``prep`` uses (e.g. a GroupNorm's weight and bias):
    they are passed through so autograd routes their gradients.  Falls back to the plain
    graph when no gradient is needed.
    """
    if not torch.is_grad_enabled():
        return conv(prep(*inputs))
    params = [conv.weight] + ([conv.bias] if conv.bias is not None else [])
    return _PrepConv.apply(prep, conv, len(inputs), tuple(prep_params), *inputs, *prep_params, *params)


class _BlockConv2(torch.autograd.Function):
    """h2 = conv2(drop(norm2(conv1(norm1(x)), b))) saving x and b; backward recomputes conv1 only."""

    @staticmethod
    def forward(ctx, block, x, b, *params):  # type: ignore[override]
        dtype = _conv_dtype(x.device.type, x)
        h1 = _conv(block.conv1, block.norm1(x), dtype)
        a2 = block.dropout(block.norm2(h1, bias_in=b.to(h1.dtype)))
        del h1
        ctx.block, ctx.dtype = block, dtype
        ctx.save_for_backward(x, b)
        return _conv(block.conv2, a2, dtype)

    @staticmethod
    def backward(ctx, grad_h2):  # type: ignore[override]
        blk = ctx.block
        x, b = ctx.saved_tensors
        need_x, need_b, *need_p = ctx.needs_input_grad[1:]
        n1w, n1b, c1w, c1b, n2w, n2b, c2w, c2b = need_p
        # Stage 1: recompute h1 (the one recomputed convolution), back-propagate conv2 and GN2.
        with torch.no_grad():
            h1 = _conv(blk.conv1, blk.norm1(x), ctx.dtype)
        with torch.enable_grad():
            h1d, bd = _detach_inputs([h1, b], [True, need_b])
            a2 = blk.dropout(blk.norm2(h1d, bias_in=bd.to(h1d.dtype)))
        grad_a2, g_c2w, g_c2b = _conv_backward(blk.conv2, grad_h2, a2, ctx.dtype, True, c2w, c2b)
        _release(a2)
        g_h1, g_b, g_n2w, g_n2b = _grads_through(a2, grad_a2, [h1d, bd, blk.norm2.weight, blk.norm2.bias],
                                                 [True, need_b, n2w, n2b])
        del a2, grad_a2, h1d, h1
        # Stage 2: back-propagate conv1 and GN1 from the block input.
        with torch.enable_grad():
            (xd,) = _detach_inputs([x], [need_x])
            a1 = blk.norm1(xd)
        grad_a1, g_c1w, g_c1b = _conv_backward(blk.conv1, g_h1, a1, ctx.dtype, a1.requires_grad, c1w, c1b)
        del g_h1
        _release(a1)
        g_x, g_n1w, g_n1b = _grads_through(a1, grad_a1, [xd, blk.norm1.weight, blk.norm1.bias], [need_x, n1w, n1b])
        del a1, grad_a1
        return None, g_x, g_b, g_n1w, g_n1b, g_c1w, g_c1b, g_n2w, g_n2b, g_c2w, g_c2b


def block_conv2(block: nn.Module, x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A residual block's second convolution output, saving only ``x`` and the time bias ``b``.

    ``block`` has norm1, conv1, norm2 (taking ``bias_in``), dropout (identity here) and
    conv2, all convolutions with biases.
    """
    if not torch.is_grad_enabled():
        h = block.conv1(block.norm1(x))
        return block.conv2(block.dropout(block.norm2(h, bias_in=b.to(h.dtype))))
    params = (block.norm1.weight, block.norm1.bias, block.conv1.weight, block.conv1.bias,
              block.norm2.weight, block.norm2.bias, block.conv2.weight, block.conv2.bias)
    return _BlockConv2.apply(block, x, b, *params)
