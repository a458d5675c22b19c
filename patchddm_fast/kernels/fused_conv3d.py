"""GroupNorm-SiLU (-> nearest x2 upsampling) -> Conv3d (+ bias, + residual) as one Triton
implicit-GEMM convolution: the activated (and upsampled) tensor never exists in memory.

    y = conv3d(up(silu(GN(x + bias_in))), conv_weight, conv_bias, stride, padding=k//2) (+ residual)

Why: in the paper's residual block every ``GroupNorm -> SiLU -> Conv`` materialises the
activated tensor, which only the convolution reads, and every decoder level
materialises its nearest-upsampled input, 8x its source, only to convolve it
(issue 9).  Here both are prologues applied while the GEMM's A operand is loaded.

Implicit GEMM (index math as in PyTorch Inductor's conv template, kernel/conv.py):
  M = output pixels of one sample (Do*Ho*Wo), N = Cout, K = taps (kd, kh, kw) x Cin.
  Program (pid_m, pid_n, n) owns a [BLOCK_M, BLOCK_N] output tile of sample n and loops
  over the KD*KH*KW taps and, per tap, over Cin in BLOCK_K chunks:
    A[m, c] = act(x[n, c, src(od*s - p + kd), src(oh*s - p + kh), src(ow*s - p + kw)])
              (0 where the tap falls into the zero padding: padding belongs to the
              *activated* tensor, so masked taps are 0, not silu(norm(0)));
              src(i) = i // 2 with upsampling (the low-resolution source), else i;
              act(v) = silu(v * scale[n, c] + shift[n, c]) with the per-(n, c)
              scale = rstd[n, g] * w[c], shift = b[c] - (mean[n, g] - bias_in[n, c]) * scale
              (one FMA + SiLU per element; 2 x N x Cin floats computed by the launcher);
    B[c, co] = conv_weight[co, c, kd, kh, kw], pre-arranged once per call as a
              (taps*Cin, Cout) matrix so each [BLOCK_K, BLOCK_N] block is a 2-D load;
    acc[BLOCK_M, BLOCK_N] += A @ B  (tl.dot, fp32 accumulator).
  Epilogue: + conv bias, + residual (fp32), one store in the output dtype.
  Channel counts that are not multiples of 16 (29, 87, 116) are padded *in registers*:
  lanes c >= Cin / co >= Cout are masked on load (A and B are 0 there) and on store.
  Any strides are addressed (channels-last-3d is the network's layout; contiguous works
  too, no copy); the output is allocated in x's layout.

Tiling and what the prologue costs.  BLOCK_N covers all output channels of the network
(next power of two of Cout, <= 128: 32 for 29, 128 for 87/116), so each A element is
activated once per program and tap and reused by every output channel -- splitting
Cout over programs would multiply the prologue by the number of Cout tiles.  What is
*not* shared is the 27-fold overlap of taps: a tap's A tile is a shifted window of the
input, and Triton has no way to slice shifted windows out of a register tile, so
every tap re-activates its window.  Per output pixel the prologue therefore runs
taps x Cin_pad times (Cin_pad = Cin rounded up to a multiple of BLOCK_K: 29 -> 32,
87 -> 96, 116 -> 128; see :func:`block_k`); per input element that is 27 times at stride 1,
27/8 ~ 3.4 times at stride 2, and 27 x 8 = 216 times with x2 upsampling (each
low-resolution element feeds 8 upsampled children).

Cost per output element (one output pixel x one output channel), 3x3x3, stride 1,
Cin_pad = P, BLOCK_N = Q (padded Cout), per-SM issue rates: MUFU 16/clk on sm_80..90;
dense fp16/bf16 MMA with fp32 accumulation 2048 (A100), 4096 (H100), 512 (RTX 4090,
RTX 3060) FLOPs/clk; fp32 FFMA/FMUL 64 (A100) or 128 (sm_86/89/90) per clk:
  tensor-core FLOPs      2 * 27 * P           (useful 2 * 27 * Cin)
  prologue activations   27 * P / Q           (27 * P per output pixel, shared by Q channels)
  each activation, compiled fp16/bf16 (SASS of the K loop, ``patchddm kernels --json``
  "sass"/"mma_loop": per thread and iteration 8 activations = 8 MUFU.TANH, 16 FFMA,
  8 FMUL, 4 F2FP packs): 1 MUFU + 3 fp32 CUDA-core instructions (+ 1/2 convert);
  fp32 (and the interpreter) uses sigmoid: 2 MUFU (EX2, RCP) + ~12 CUDA-core instructions.
  Cin = Cout = 29 (P = Q = 32): 1728 MMA FLOPs, 27 MUFU, ~95 ALU per output element:
    MMA 0.84 clk (A100) / 0.42 (H100) / 3.4 (4090, 3060); MUFU 1.7 clk everywhere;
    ALU 1.5 (A100) / 0.74 clk.  On A100/H100 the SFU, not the tensor cores, bounds
    the 29-channel layers (2-4x); on the consumer cards the tensor cores do.
  Cin = Cout = 116 (P = Q = 128): 6912 MMA FLOPs (3.4 / 1.7 / 13.5 clk) and still 27 MUFU
    (1.7 clk): Q = P, so the prologue per output element does not grow with the width.
  87 -> 116 (P = 96, Q = 128): 20 MUFU per output element.
  x2 upsampling: the same per output element (the prologue is per output-pixel tap);
  stride 2: the same per output element, 8x fewer output elements; 1x1x1: 1 activation
  per input element, P / Q per output element (no tap overlap).
How this could be paid fewer times (left for later, issue 9): activate a halo brick of
(B+2)^3 pixels once into shared memory and read the 27 shifted windows from there
(27 -> (1 + 2/B)^3 activations per input element, 1.95 for B = 8).

Statistics: the per-(sample, group) mean/rstd come from the GroupNorm-SiLU statistics
kernels (:func:`.gn_silu.statistics`: one read of x), so a block reads x twice
(statistics, convolution) and writes y once; nothing of the activated tensor is written.

What runs where (this module):
  forward  -- CUDA: the Triton kernels (statistics + this conv); CPU: the plain-PyTorch
              composite, or, with the "triton-interpret" CPU backend, the very same Triton
              kernels through the interpreter; float64 always runs the composite.
  backward -- a recompute: the activated (upsampled) input is recomputed from the saved x
              and statistics (Triton GN-SiLU apply kernel, or composite), the conv's input
              and weight gradients come from ``aten.convolution_backward`` (cuDNN / oneDNN),
              the upsampling's gradient sums the 2x2x2 children, and the GN-SiLU backward
              is the Triton one (:func:`.gn_silu.backward`) or the composite.  Only x, the
              parameters and the (N, groups) statistics are saved; the recomputed
              activation is a temporary of the backward.  Triton dgrad/wgrad kernels with
              the prologue fused are not written yet.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import composite, gn_silu
from ._layout import fresh, in_kernel_layout, layout_of, memory_format
from ._triton import KernelVariant, kernel, launch, next_power_of_2, sigmoid_
from .backends import cpu_implementation

Tensor = torch.Tensor

BLOCK_M_CUDA = 64
BLOCK_M_INTERPRETED = 64
MAX_BLOCK_N = 128
# 8 warps: a [64, 128] fp32 accumulator is 32 registers per thread; with 4 warps the
# fp16 Cout-128 tile needs 255 registers on sm_80 (182 with 8), fp32 (FMA dot) 255 either way.
NUM_WARPS_CUDA = 8
KERNEL_SIZES = (1, 3)


# --------------------------------------------------------------------------- kernel
@kernel
def _conv3d_fwd_kernel(X, SCALE, SHIFT, WT, CB, RES, Y,
                       Cin, Cout, D, H, W, Do, Ho, Wo,
                       sxn, sxc, sxd, sxh, sxw, syn, syc, syd, syh, syw,
                       srn, src, srd, srh, srw,
                       K: tl.constexpr, STRIDE: tl.constexpr, UPSAMPLE: tl.constexpr,
                       NORM: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
                       DOT_FP32: tl.constexpr, FAST_SILU: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One [BLOCK_M output pixels, BLOCK_N output channels] tile of sample ``n``.

    D, H, W are the sizes of x (the low-resolution source when UPSAMPLE).  FAST_SILU
    (compiled fp16/bf16 only): silu(u) = h + h*tanh(h), h = u/2, with one MUFU.TANH
    (max relative error 2^-11, below the fp16/bf16 rounding of the GEMM operand)
    instead of EX2 + a full-range division; the interpreter cannot run inline PTX."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    n = tl.program_id(2)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m < Do * Ho * Wo
    ow = m % Wo
    t = m // Wo
    oh = t % Ho
    od = t // Ho
    co = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    co_ok = co < Cout
    kk = tl.arange(0, BLOCK_K)
    x_base = X + n.to(tl.int64) * sxn
    if UPSAMPLE:
        DU = 2 * D
        HU = 2 * H
        WU = 2 * W
    else:
        DU = D
        HU = H
        WU = W
    PAD: tl.constexpr = K // 2
    acc = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
    for tap in range(0, K * K * K):
        kd = tap // (K * K)
        kh = (tap // K) % K
        kw = tap % K
        # Position in the (virtual, upsampled) convolution input, then in x.
        pd = od * STRIDE - PAD + kd
        ph = oh * STRIDE - PAD + kh
        pw = ow * STRIDE - PAD + kw
        inside = m_ok & (pd >= 0) & (pd < DU) & (ph >= 0) & (ph < HU) & (pw >= 0) & (pw < WU)
        if UPSAMPLE:
            pd = pd // 2
            ph = ph // 2
            pw = pw // 2
        sp = pd * sxd + ph * sxh + pw * sxw
        for k0 in range(0, Cin, BLOCK_K):
            c = k0 + kk
            c_ok = c < Cin
            a_mask = inside[:, None] & c_ok[None, :]
            a = tl.load(x_base + sp[:, None] + c[None, :] * sxc, mask=a_mask, other=0.0)
            a = a.to(tl.float32)
            if NORM:
                scale = tl.load(SCALE + n * Cin + c, mask=c_ok, other=0.0)
                shift = tl.load(SHIFT + n * Cin + c, mask=c_ok, other=0.0)
                u = a * scale[None, :] + shift[None, :]
                if FAST_SILU:
                    h = 0.5 * u
                    th = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [h],
                                                   dtype=tl.float32, is_pure=True, pack=1)
                    act = h + h * th
                else:
                    act = u * sigmoid_(u)
                # zero padding belongs to the activated tensor
                a = tl.where(a_mask, act, 0.0)
            b = tl.load(WT + (tap * Cin + c)[:, None] * Cout + co[None, :],
                        mask=c_ok[:, None] & co_ok[None, :], other=0.0)
            if DOT_FP32:
                acc += tl.dot(a, b.to(tl.float32), input_precision="ieee")
            else:
                acc += tl.dot(a.to(X.dtype.element_ty), b.to(X.dtype.element_ty))
    if HAS_BIAS:
        acc += tl.load(CB + co, mask=co_ok, other=0.0).to(tl.float32)[None, :]
    out_mask = m_ok[:, None] & co_ok[None, :]
    if HAS_RES:
        r_off = (od * srd + oh * srh + ow * srw)[:, None] + co[None, :] * src
        acc += tl.load(RES + n.to(tl.int64) * srn + r_off, mask=out_mask, other=0.0).to(tl.float32)
    y_off = (od * syd + oh * syh + ow * syw)[:, None] + co[None, :] * syc
    tl.store(Y + n.to(tl.int64) * syn + y_off, acc.to(Y.dtype.element_ty), mask=out_mask)


# --------------------------------------------------------------------------- planning
def output_shape(x_shape: Sequence[int], cout: int, k: int, stride: int, upsample: bool
                 ) -> Tuple[int, ...]:
    """(N, Cout, Do, Ho, Wo) of the convolution (padding k//2)."""
    up = 2 if upsample else 1
    return (x_shape[0], cout) + tuple((up * d + 2 * (k // 2) - k) // stride + 1 for d in x_shape[2:])


def block_n(cout: int) -> int:
    """Output channels per program: all of the network's (<= 128), at least tl.dot's 16."""
    return max(16, min(MAX_BLOCK_N, next_power_of_2(cout)))


def block_k(cin: int, fp32: bool = False) -> int:
    """Input channels per GEMM step, the same in the interpreter as on CUDA: 32 for
    fp16/bf16 (29 -> 32, 87 -> 3 x 32, 116 -> 4 x 32); 16 for fp32 (the CUDA-core FMA dot),
    whose [32, 128] fp32 operands would need 57 KB of shared memory (over 48 KB); 16 for
    Cin <= 16."""
    return 16 if cin <= 16 or fp32 else 32


def empty_output(x: Tensor, shape: Sequence[int]) -> Tensor:
    """The output tensor, in x's kernel layout (channels-last-3d or contiguous)."""
    return torch.empty(tuple(shape), dtype=x.dtype, device=x.device,
                       memory_format=memory_format(layout_of(x) or "cf", len(shape)))


def _channel_affine(norm_weight: Tensor, norm_bias: Tensor, bias_in: Optional[Tensor], mean: Tensor,
                    rstd: Tensor, groups: int) -> Tuple[Tensor, Tensor]:
    """Per-(n, c) fp32 (scale, shift) with silu(GN(x + bias_in)) = silu(x * scale + shift)."""
    cpg = norm_weight.shape[0] // groups
    scale = rstd.repeat_interleave(cpg, dim=1) * norm_weight.float()
    center = mean.repeat_interleave(cpg, dim=1)
    if bias_in is not None:
        center = center - bias_in.float()
    shift = norm_bias.float() - center * scale
    return scale.contiguous(), shift.contiguous()


# --------------------------------------------------------------------------- launchers
def conv_forward(x: Tensor, scale: Optional[Tensor], shift: Optional[Tensor], conv_weight: Tensor,
                 conv_bias: Optional[Tensor], residual: Optional[Tensor], stride: int,
                 upsample: bool) -> Tensor:
    """Triton conv with optional GN-SiLU prologue (scale/shift None: no norm)."""
    x = in_kernel_layout(x)
    cout, cin, k = conv_weight.shape[:3]
    shape = output_shape(x.shape, cout, k, stride, upsample)
    cuda = x.device.type == "cuda"
    dot_fp32 = x.dtype == torch.float32 or not cuda  # the interpreter's bf16/fp16 dot is unreliable
    wt = conv_weight.permute(2, 3, 4, 1, 0).reshape(k * k * k * cin, cout)
    wt = wt.to(torch.float32 if dot_fp32 else x.dtype).contiguous()
    y = fresh(empty_output(x, shape))
    if residual is not None:
        residual = residual if layout_of(residual) is not None else residual.contiguous()
    res = residual if residual is not None else y  # dummy pointer, never read
    bias = conv_bias.contiguous() if conv_bias is not None else wt
    norm = scale is not None
    scale_arg = scale if norm else wt
    shift_arg = shift if norm else wt
    bm = BLOCK_M_CUDA if cuda else BLOCK_M_INTERPRETED
    bn = block_n(cout)
    s_out = shape[2] * shape[3] * shape[4]
    grid = (triton.cdiv(s_out, bm), triton.cdiv(cout, bn), shape[0])
    launch(_conv3d_fwd_kernel, grid, x.device, x, scale_arg, shift_arg, wt, bias, res, y,
           cin, cout, *x.shape[2:], *shape[2:], *x.stride(), *y.stride(), *res.stride(),
           num_warps=NUM_WARPS_CUDA, K=k, STRIDE=stride, UPSAMPLE=upsample, NORM=norm,
           HAS_BIAS=conv_bias is not None, HAS_RES=residual is not None, DOT_FP32=dot_fp32,
           FAST_SILU=not dot_fp32, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=block_k(cin, x.dtype == torch.float32))
    return y


def forward(x: Tensor, norm_weight: Tensor, norm_bias: Tensor, bias_in: Optional[Tensor], groups: int,
            eps: float, conv_weight: Tensor, conv_bias: Optional[Tensor], residual: Optional[Tensor],
            stride: int, upsample: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """Triton forward: ``(y, mean, rstd)`` (statistics kernels, then the fused conv)."""
    mean, rstd = gn_silu.statistics(x, bias_in, groups, eps)
    scale, shift = _channel_affine(norm_weight, norm_bias, bias_in, mean, rstd, groups)
    y = conv_forward(x, scale, shift, conv_weight, conv_bias, residual, stride, upsample)
    return y, mean, rstd


def _upsample(a: Tensor, upsample: bool) -> Tensor:
    return F.interpolate(a, scale_factor=2, mode="nearest") if upsample else a


def composite_forward(x: Tensor, norm_weight: Tensor, norm_bias: Tensor, bias_in: Optional[Tensor],
                      groups: int, eps: float, conv_weight: Tensor, conv_bias: Optional[Tensor],
                      residual: Optional[Tensor], stride: int, upsample: bool
                      ) -> Tuple[Tensor, Tensor, Tensor]:
    """Plain-PyTorch forward in fp32 (fp64 for fp64 inputs): materialises the activation."""
    mean, rstd = composite.gn_statistics(x, bias_in, groups, eps)
    a = _upsample(composite.gn_silu_apply(x, norm_weight, norm_bias, bias_in, mean, rstd, groups), upsample)
    dt = a.dtype
    k = conv_weight.shape[2]
    out = F.conv3d(a, conv_weight.to(dt), None if conv_bias is None else conv_bias.to(dt),
                   stride, k // 2)
    if residual is not None:
        out = out + residual.to(dt)
    y = empty_output(x, out.shape)
    y.copy_(out)
    return y, mean.float(), rstd.float()


def _activation(impl: str, x: Tensor, norm_weight: Tensor, norm_bias: Tensor, bias_in: Optional[Tensor],
                mean: Tensor, rstd: Tensor, groups: int) -> Tensor:
    """The recomputed prologue output silu(GN(x + bias_in)) in fp32 (fp64 for fp64 x)."""
    if impl == "triton":
        return gn_silu.apply(x, norm_weight, norm_bias, bias_in, mean, rstd, groups, torch.float32)
    return composite.gn_silu_apply(x, norm_weight, norm_bias, bias_in, mean, rstd, groups)


_GN_BACKWARD: Dict[str, Callable] = {"triton": gn_silu.backward, "composite": composite.gn_silu_backward}


def backward(impl: str, dy: Tensor, x: Tensor, norm_weight: Tensor, norm_bias: Tensor,
             bias_in: Optional[Tensor], mean: Tensor, rstd: Tensor, groups: int, conv_weight: Tensor,
             conv_bias: Optional[Tensor], stride: int, upsample: bool):
    """Recompute backward: ``(dx, dnorm_weight, dnorm_bias, dbias_in|None, dconv_weight,
    dconv_bias|None)``.  The activation is recomputed from x and the statistics."""
    a = _upsample(_activation(impl, x, norm_weight, norm_bias, bias_in, mean, rstd, groups), upsample)
    dt = a.dtype
    k = conv_weight.shape[2]
    has_bias = conv_bias is not None
    da, dw, db = torch.ops.aten.convolution_backward(
        dy.to(dt), a, conv_weight.to(dt), [conv_weight.shape[0]] if has_bias else None,
        [stride] * 3, [k // 2] * 3, [1] * 3, False, [0] * 3, 1, [True, True, has_bias])
    del a
    if upsample:  # nearest x2 backward: each source element sums its 2x2x2 children
        n, c, d, h, w = x.shape
        da = da.reshape(n, c, d, 2, h, 2, w, 2).sum((3, 5, 7))
    dx, dnw, dnb, dbias_in = _GN_BACKWARD[impl](da, x, norm_weight, norm_bias, bias_in, mean, rstd, groups)
    return (dx, dnw, dnb, dbias_in, dw.to(conv_weight.dtype),
            db.to(conv_bias.dtype) if has_bias else None)


# --------------------------------------------------------------------------- custom ops
def _kernels_take(x: Tensor, groups: int) -> bool:
    """Whether the Triton kernels take these inputs (else the composite runs)."""
    n, c = x.shape[:2]
    return (x.dtype in (torch.float32, torch.float16, torch.bfloat16)
            and gn_silu.supported(groups, c // groups) and x.numel() // n < 2 ** 31)


def _implementation(x: Tensor, groups: int) -> str:
    ok = _kernels_take(x, groups)
    if x.device.type == "cuda":
        return "triton" if ok else "composite"
    return cpu_implementation(triton_ok=ok, cpp_ok=False)


def _conform(t: Tensor, like: Tensor) -> Tensor:
    """``t`` in x's kernel layout (what the fake implementation promises)."""
    fmt = memory_format(layout_of(like) or "cf", t.dim())
    return t if t.is_contiguous(memory_format=fmt) else t.contiguous(memory_format=fmt)


@torch.library.custom_op("patchddm::gn_silu_conv3d_fwd", mutates_args=(), device_types=("cuda", "cpu"))
def gn_silu_conv3d_fwd(x: Tensor, norm_weight: Tensor, norm_bias: Tensor, bias_in: Optional[Tensor],
                       groups: int, eps: float, conv_weight: Tensor, conv_bias: Optional[Tensor],
                       residual: Optional[Tensor], stride: int, upsample: bool
                       ) -> Tuple[Tensor, Tensor, Tensor]:
    """Fused forward: ``(y, mean, rstd)``; only x and the (N, groups) statistics are kept."""
    impl = _implementation(x, groups)
    run = forward if impl == "triton" else composite_forward
    return run(x, norm_weight, norm_bias, bias_in, groups, eps, conv_weight, conv_bias, residual,
               stride, upsample)


@gn_silu_conv3d_fwd.register_fake
def _fwd_fake(x, norm_weight, norm_bias, bias_in, groups, eps, conv_weight, conv_bias, residual,
              stride, upsample):
    shape = output_shape(x.shape, conv_weight.shape[0], conv_weight.shape[2], stride, upsample)
    stats = (x.shape[0], groups)
    return (empty_output(x, shape), x.new_empty(stats, dtype=torch.float32),
            x.new_empty(stats, dtype=torch.float32))


@torch.library.custom_op("patchddm::gn_silu_conv3d_bwd", mutates_args=(), device_types=("cuda", "cpu"))
def gn_silu_conv3d_bwd(dy: Tensor, x: Tensor, norm_weight: Tensor, norm_bias: Tensor,
                       bias_in: Optional[Tensor], mean: Tensor, rstd: Tensor, groups: int,
                       conv_weight: Tensor, conv_bias: Optional[Tensor], stride: int, upsample: bool
                       ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Fused backward: ``(dx, dnorm_weight, dnorm_bias, dbias_in, dconv_weight, dconv_bias)``;
    dbias_in / dconv_bias are empty (0,) without bias_in / conv_bias."""
    dx, dnw, dnb, dbi, dw, db = backward(_implementation(x, groups), dy, x, norm_weight, norm_bias,
                                         bias_in, mean, rstd, groups, conv_weight, conv_bias, stride,
                                         upsample)
    return (_conform(dx, x), dnw, dnb, x.new_empty((0,)) if dbi is None else dbi, dw,
            x.new_empty((0,)) if db is None else db)


@gn_silu_conv3d_bwd.register_fake
def _bwd_fake(dy, x, norm_weight, norm_bias, bias_in, mean, rstd, groups, conv_weight, conv_bias,
              stride, upsample):
    empty = x.new_empty((0,))
    return (empty_output(x, x.shape), norm_weight.new_empty(norm_weight.shape),
            norm_bias.new_empty(norm_bias.shape),
            empty if bias_in is None else bias_in.new_empty(bias_in.shape),
            conv_weight.new_empty(conv_weight.shape),
            empty if conv_bias is None else conv_bias.new_empty(conv_bias.shape))


def _setup_context(ctx, inputs, output) -> None:
    x, norm_weight, norm_bias, bias_in, groups, _eps, conv_weight, conv_bias, residual, stride, upsample = inputs
    _y, mean, rstd = output
    # Parameters are alive anyway; x, bias_in and the (N, groups) statistics are the only
    # activation memory kept -- not the activated, not the upsampled tensor.
    ctx.save_for_backward(x, norm_weight, norm_bias, bias_in, mean, rstd, conv_weight, conv_bias)
    ctx.conf = (groups, stride, upsample, residual is not None)
    ctx.residual_meta = None if residual is None else (residual.dtype, residual.shape)
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, dy, _dmean, _drstd):
    x, norm_weight, norm_bias, bias_in, mean, rstd, conv_weight, conv_bias = ctx.saved_tensors
    groups, stride, upsample, has_residual = ctx.conf
    dx, dnw, dnb, dbi, dw, db = gn_silu_conv3d_bwd(dy, x, norm_weight, norm_bias, bias_in, mean, rstd,
                                                   groups, conv_weight, conv_bias, stride, upsample)
    dres = dy.to(ctx.residual_meta[0]) if has_residual else None
    return (dx, dnw, dnb, dbi if bias_in is not None else None, None, None, dw,
            db if conv_bias is not None else None, dres, None, None)


gn_silu_conv3d_fwd.register_autograd(_backward, setup_context=_setup_context)


def _check_args(x: Tensor, norm_weight: Tensor, norm_bias: Tensor, groups: int, conv_weight: Tensor,
                conv_bias: Optional[Tensor], bias_in: Optional[Tensor], stride: int,
                upsample: bool, residual: Optional[Tensor]) -> None:
    name = "gn_silu_conv3d"
    if x.dim() != 5 or not x.is_floating_point() or x.numel() == 0:
        raise ValueError(f"{name}: x must be a non-empty floating (N, C, D, H, W) tensor, "
                         f"got {x.dtype} {tuple(x.shape)}")
    n, c = x.shape[:2]
    if not isinstance(groups, int) or groups <= 0 or c % groups:
        raise ValueError(f"{name}: groups={groups!r} must be a positive divisor of the {c} channels")
    for pname, t in (("norm_weight", norm_weight), ("norm_bias", norm_bias)):
        if tuple(t.shape) != (c,):
            raise ValueError(f"{name}: {pname} must have shape ({c},), got {tuple(t.shape)}")
    if bias_in is not None and tuple(bias_in.shape) != (n, c):
        raise ValueError(f"{name}: bias_in must have shape ({n}, {c}), got {tuple(bias_in.shape)}")
    k = conv_weight.shape[-1] if conv_weight.dim() == 5 else None
    if k not in KERNEL_SIZES or tuple(conv_weight.shape[1:]) != (c, k, k, k):
        raise ValueError(f"{name}: conv_weight must be (Cout, {c}, k, k, k) with k in {KERNEL_SIZES}, "
                         f"got {tuple(conv_weight.shape)}")
    cout = conv_weight.shape[0]
    if conv_bias is not None and tuple(conv_bias.shape) != (cout,):
        raise ValueError(f"{name}: conv_bias must have shape ({cout},), got {tuple(conv_bias.shape)}")
    if stride not in (1, 2):
        raise ValueError(f"{name}: stride must be 1 or 2, got {stride!r}")
    if upsample and stride != 1:  # not a layer of the network, and not tested
        raise ValueError(f"{name}: upsample=True needs stride 1, got stride {stride}")
    shape = output_shape(x.shape, cout, k, stride, upsample)
    if residual is not None and tuple(residual.shape) != shape:
        raise ValueError(f"{name}: residual must have the output's shape {shape}, got {tuple(residual.shape)}")
    for pname, t in (("norm_weight", norm_weight), ("norm_bias", norm_bias), ("bias_in", bias_in),
                     ("conv_weight", conv_weight), ("conv_bias", conv_bias), ("residual", residual)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name}: {pname} is on {t.device}, x on {x.device}")


def gn_silu_conv3d(x: Tensor, norm_weight: Tensor, norm_bias: Tensor, groups: int, conv_weight: Tensor,
                   conv_bias: Optional[Tensor] = None, *, eps: float = 1e-5,
                   bias_in: Optional[Tensor] = None, stride: int = 1, upsample: bool = False,
                   residual: Optional[Tensor] = None) -> Tensor:
    """``conv3d(up(silu(group_norm(x + bias_in))), conv_weight, conv_bias, stride, k//2) (+ residual)``.

    ``x`` (N, C, D, H, W) fp32/fp16/bf16 (fp64 runs the composite), channels-last-3d or
    contiguous (the output follows); ``up`` is nearest x2 when ``upsample``; conv_weight
    (Cout, C, k, k, k), k in {1, 3}; stride 1 or 2; ``bias_in`` (N, C) is added before the
    norm (part of its statistics); ``residual`` has the output's shape.  Statistics and
    accumulation in fp32; output in x's dtype.  Autograd for every tensor argument, saving
    only x (+ bias_in) and the per-(sample, group) statistics.
    """
    _check_args(x, norm_weight, norm_bias, groups, conv_weight, conv_bias, bias_in, stride, upsample,
                residual)
    return gn_silu_conv3d_fwd(x, norm_weight, norm_bias, bias_in, groups, float(eps), conv_weight,
                              conv_bias, residual, int(stride), bool(upsample))[0]


# --------------------------------------------------------------------------- AOT variants
NETWORK_CHANNELS = (29, 87, 116)


def aot_variants(dtypes: Sequence[str] = ("fp32", "fp16", "bf16")) -> List[KernelVariant]:
    """The compiled conv specialisations for the network (channels-last activations, weights
    pre-arranged in the activation dtype; fp32 runs an exact fp32 dot).  One variant per
    (dtype, kernel/stride/upsample kind, Cout tile); Cin enters only at run time."""
    out = []
    kinds = [("k3s1", 3, 1, False, True, False), ("k3s1_res", 3, 1, False, True, True),
             ("k3s2", 3, 2, False, True, False), ("k3s1_up", 3, 1, True, True, False),
             ("k1s1", 1, 1, False, True, False)]
    for dt in dtypes:
        act = f"*{dt}"
        for tag, k, stride, up, norm, res in kinds:
            for bn in sorted({block_n(c) for c in NETWORK_CHANNELS}):
                consts = dict(K=k, STRIDE=stride, UPSAMPLE=up, NORM=norm, HAS_BIAS=True, HAS_RES=res,
                              DOT_FP32=dt == "fp32", FAST_SILU=dt != "fp32", BLOCK_M=BLOCK_M_CUDA, BLOCK_N=bn,
                              BLOCK_K=block_k(max(NETWORK_CHANNELS), dt == "fp32"), sxc=1, syc=1, src=1)
                types = dict(X=act, SCALE="*fp32", SHIFT="*fp32", WT=act if dt != "fp32" else "*fp32",
                             CB="*fp32", RES=act, Y=act)
                out.append(KernelVariant(f"gn_silu_conv3d[{dt},{tag},n{bn}]", _conv3d_fwd_kernel,
                                         types, consts, NUM_WARPS_CUDA))
    return out
