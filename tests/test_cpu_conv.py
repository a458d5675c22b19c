"""oneDNN 3D convolution (forward and both gradients as forward convolutions) against
float64 ``F.conv3d`` and its autograd, at the network's kernel/stride/padding combinations
and odd sizes (the stride's rounding remainder)."""
import pytest
import torch
import torch.nn.functional as F

from patchddm_fast.kernels import conv3d_cpu as cpu_conv

CASES = [  # (cin, cout, kernel, stride, padding, size)
    (3, 5, 3, 1, 1, (6, 5, 7)),   # residual-block conv
    (4, 4, 3, 2, 1, (8, 6, 4)),   # downsample, even sizes
    (4, 3, 3, 2, 1, (7, 5, 9)),   # downsample, odd sizes: a row the forward never reaches
    (5, 2, 1, 1, 0, (4, 3, 5)),   # 1x1x1 shortcut
]


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN")
@pytest.mark.parametrize("cin,cout,k,stride,pad,size", CASES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("backward", ["as-forward-convolutions", "pytorch"])
def test_onednn_conv3d_matches_float64_autograd(cin, cout, k, stride, pad, size, bias, backward, monkeypatch):
    # Force the backward path (the real choice depends on PyTorch's size heuristic).
    monkeypatch.setattr(cpu_conv, "SMALL_NUMEL", 0)
    monkeypatch.setattr(cpu_conv, "aten_takes_slow_path", lambda x, w: backward == "as-forward-convolutions")
    g = torch.Generator().manual_seed(hash((cin, cout, k, stride, size, bias)) % 2**31)
    x = torch.randn(2, cin, *size, generator=g)
    w = torch.randn(cout, cin, k, k, k, generator=g) * 0.3
    b = torch.randn(cout, generator=g) if bias else None
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    b64 = b.double().requires_grad_() if bias else None
    ref = F.conv3d(x64, w64, b64, stride, pad)
    upstream = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    ref.backward(upstream)

    xf, wf = x.clone().requires_grad_(), w.clone().requires_grad_()
    bf = b.clone().requires_grad_() if bias else None
    assert cpu_conv.onednn_usable(xf, wf)
    out = cpu_conv.conv3d(xf, wf, bf, [stride] * 3, [pad] * 3)
    out.backward(upstream.float())

    def rel(a, r):
        return ((a.double() - r).norm() / r.norm()).item()

    assert out.shape == ref.shape
    assert rel(out.detach(), ref.detach()) < 1e-5
    assert rel(xf.grad, x64.grad) < 1e-5
    assert rel(wf.grad, w64.grad) < 1e-5
    if bias:
        assert rel(bf.grad, b64.grad) < 1e-5


def test_slow_path_test_follows_pytorchs_heuristic():
    w3 = torch.zeros(4, 16, 3, 3, 3)
    assert cpu_conv.aten_takes_slow_path(torch.zeros(1, 16, 32, 32, 32), w3)      # 16*32*32 = 16384
    assert not cpu_conv.aten_takes_slow_path(torch.zeros(1, 29, 64, 64, 64), w3)  # 118784 > 20480
    assert not cpu_conv.aten_takes_slow_path(torch.zeros(2, 16, 8, 8, 8), w3)     # batches take oneDNN


def test_fp16_gpu_or_autocast_tensors_are_not_routed_to_onednn():
    assert not cpu_conv.onednn_usable(torch.zeros(1, dtype=torch.float16), torch.zeros(1))
    assert not cpu_conv.onednn_usable(torch.zeros(1, device="meta"), torch.zeros(1, device="meta"))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast must see F.conv3d to lower its precision
        assert not cpu_conv.onednn_usable(torch.zeros(1), torch.zeros(1))
