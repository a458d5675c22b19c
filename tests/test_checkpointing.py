"""Checkpointing, offload and tiled inference change memory, never results.

Reference: the plain graph of the same network (recompute="none", no offload), fresh
random weights (the zero-initialised output convolutions re-drawn so every gradient is
non-trivial) and a random upstream gradient.
"""
import pytest
import torch

from patchddm_fast.model.execution.offload import CpuStore
from patchddm_fast.model.execution.policy import ExecutionPolicy
from patchddm_fast.analysis.simulate import mkldnn_disabled
from patchddm_fast.model.unet import RECOMPUTE_MODES, UNet3D, count_parameters

TINY = dict(in_channels=5, base_width=8, channel_mult=(1, 2, 2), groups=4)
MODES = [m for m in RECOMPUTE_MODES if m != "none"]


def _fused_available():
    try:
        import patchddm_fast.kernels  # noqa: F401
    except Exception:
        return False
    return True


OPS = ["reference"] + (["fused"] if _fused_available() else [])


def _model(ops, recompute="none"):
    torch.manual_seed(0)
    m = UNet3D(**TINY, policy=ExecutionPolicy(ops=ops, recompute=recompute))
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.2)
    return m


def _grads(model, autocast_dtype=None):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 5, 16, 16, 16, generator=g)
    with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        y = model(x, torch.tensor([7]))
    (y.float() * torch.randn(y.shape, generator=g)).sum().backward()
    return y.detach().float(), [p.grad.clone() for p in model.parameters()]


def _assert_same(out, ref, rtol=1e-6):
    """Equal up to fp32 summation order (rtol relative to each tensor's largest entry)."""
    assert torch.allclose(out[0], ref[0], rtol=rtol, atol=rtol * ref[0].abs().max().item())
    for a, b in zip(out[1], ref[1]):
        assert torch.allclose(a, b, rtol=rtol, atol=rtol * b.abs().max().item())


@pytest.mark.parametrize("ops", OPS)
def test_checkpointing_gives_the_same_gradients_fp32(ops):
    ref = _grads(_model(ops))
    for mode in MODES:
        _assert_same(_grads(_model(ops, mode)), ref)


@pytest.mark.parametrize("ops", OPS)
def test_checkpointing_casts_like_autocast_bf16(ops):
    # Under CPU bf16 autocast the recomputing nodes cast exactly what autocast casts: bitwise
    # equal results.  (oneDNN off: the ops backend's CPU-only oneDNN convolution bypasses autocast.)
    with mkldnn_disabled():
        ref = _grads(_model(ops), torch.bfloat16)
        for mode in MODES:
            out = _grads(_model(ops, mode), torch.bfloat16)
            assert all(torch.equal(a, b) for a, b in zip(out[1], ref[1])) and torch.equal(out[0], ref[0])


@pytest.mark.parametrize("offload,mode", [("skips", "none"), ("all", "block"), ("all", "level")])
def test_offloaded_training_gives_the_same_gradients(offload, mode):
    ref = _grads(_model("reference"))
    policy = ExecutionPolicy(recompute=mode, offload=offload, offload_min_bytes=0)
    model = _model("reference").apply_policy(policy, store=CpuStore())
    # a skip's gradient now arrives through host memory: accumulated in another order
    _assert_same(_grads(model), ref, rtol=1e-5)


@pytest.mark.parametrize("ops", OPS)
@pytest.mark.parametrize("offload", ["none", "skips"])
def test_tiled_inference_matches_the_plain_forward(ops, offload, monkeypatch):
    import patchddm_fast.model.execution.tiled as tiled

    monkeypatch.setattr(tiled, "SMALL_BYTES", 0)  # slab even these tiny tensors
    model = _model(ops).eval()
    x = torch.randn(1, 5, 16, 16, 16, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([11])
    with torch.no_grad():
        ref = model(x, t)
        for rows in (1, None):  # 1: every in-place slab overwrites rows the next one needs
            model.apply_policy(ExecutionPolicy(ops=ops, offload=offload, tiled=True, slab_rows=rows), store=CpuStore())
            out = model(x, t)
            assert (out - ref).abs().max() <= 2e-6 * ref.abs().max()
        model.apply_policy(ExecutionPolicy(ops=ops))
        assert torch.equal(model(x, t), ref)


def test_parameter_count_is_unchanged_by_every_mode():
    with torch.device("meta"):
        for mode in RECOMPUTE_MODES:
            policy = ExecutionPolicy(recompute=mode)
            assert count_parameters(UNet3D.from_method("patchddm", policy=policy)) == 24_260_299


def test_unknown_modes_are_rejected():
    with pytest.raises(ValueError, match="recompute must be one of"):
        UNet3D(**TINY, policy=ExecutionPolicy(recompute="blocks"))
    with pytest.raises(ValueError, match="offload must be one of"):
        UNet3D(**TINY).apply_policy(ExecutionPolicy(offload="disk"))
    with pytest.raises(ValueError, match="ops must be one of"):
        UNet3D(**TINY).apply_policy(ExecutionPolicy(ops="triton"))
