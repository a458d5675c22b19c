"""The precision policy contract used by the Trainer and the sampler."""
import pytest
import torch
import torch.nn.functional as F

from patchddm_fast.model.execution.precision import NoScaler, resolve_precision


def test_auto_on_cpu_is_a_real_fp32_noop():
    p = resolve_precision("auto", "cpu")
    assert p.name == "fp32" and p.dtype == torch.float32 and not p.mixed
    with p.autocast():
        assert not torch.is_autocast_enabled("cpu")
    assert isinstance(p.scaler, NoScaler)


def test_noscaler_has_gradscalers_interface():
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=0.5)
    s = NoScaler()
    loss = (w * 2).sum()
    assert s.scale(loss) is loss
    s.scale(loss).backward()
    s.unscale_(opt)
    s.step(opt)
    s.update()
    assert torch.equal(w.detach(), torch.zeros(3))  # 1 - 0.5 * 2: the step really happened
    assert s.state_dict() == {} and s.get_scale() == 1.0 and not s.is_enabled()
    s.load_state_dict({"scale": 65536.0})  # an fp16 checkpoint's scaler state is accepted and ignored


def test_explicit_bf16_on_cpu_autocasts_convolutions_but_not_statistics():
    p = resolve_precision("bf16", "cpu")
    assert p.dtype == torch.bfloat16 and isinstance(p.scaler, NoScaler)
    x = torch.randn(1, 4, 4, 4, 4)
    w = torch.randn(4, 4, 3, 3, 3)
    with p.autocast():
        assert F.conv3d(x, w, padding=1).dtype == torch.bfloat16
        assert F.group_norm(x.float(), 2).dtype == torch.float32


def test_fp16_uses_dynamic_loss_scaling():
    p = resolve_precision("fp16", "cpu")
    assert isinstance(p.scaler, torch.amp.GradScaler) and p.scaler.is_enabled()
    assert p.dtype == torch.float16


def test_bad_names_are_explained():
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("half", "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to resolve 'auto' to bf16/fp16")
def test_auto_on_cuda_is_mixed():
    p = resolve_precision("auto", "cuda")
    major = torch.cuda.get_device_capability()[0]
    assert p.name == ("bf16" if major >= 8 else "fp16")
    assert isinstance(p.scaler, torch.amp.GradScaler) == (p.name == "fp16")
