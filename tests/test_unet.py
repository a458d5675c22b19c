"""The network: exact parameter counts, shapes, size errors, ablation switch."""
import pytest
import torch

from patchddm_fast import UNet3D
from patchddm_fast.model import ExecutionPolicy, count_parameters, timestep_embedding


@pytest.mark.parametrize("method,expected", [("patchddm", 24_260_299), ("fullres", 24_257_950), ("halfres", 24_257_950)])
def test_paper_parameter_counts(method, expected):
    assert count_parameters(UNet3D.from_method(method)) == expected


def test_paper_network_structure():
    m = UNet3D.from_method("patchddm")
    assert m.size_multiple == 64
    convs = [mod for mod in m.modules() if isinstance(mod, torch.nn.Conv3d)]
    assert convs[0].in_channels == 8 and convs[0].out_channels == 29
    # zero-initialised output conv: an untrained network predicts zero noise
    assert torch.count_nonzero(m.conv_out.weight) == 0
    widths = sorted({mod.num_channels for mod in m.modules() if isinstance(mod, torch.nn.GroupNorm)})
    assert widths == [29, 87, 116]
    assert all(mod.num_groups == 29 for mod in m.modules() if isinstance(mod, torch.nn.GroupNorm))


@pytest.mark.parametrize("size", [(8, 8, 8), (12, 8, 16), (16, 20, 4)])
def test_output_shapes(tiny_unet_factory, size):
    m = tiny_unet_factory()
    x = torch.randn(2, 5, *size)
    y = m(x, torch.tensor([0, 999]))
    assert y.shape == (2, 1, *size)


def test_paper_network_runs_at_64(tiny_unet_factory):
    m = UNet3D.from_method("patchddm")
    with torch.no_grad():
        y = m(torch.randn(1, 8, 64, 64, 64), torch.tensor([500]))
    assert y.shape == (1, 1, 64, 64, 64)


def test_bad_sizes_give_clear_errors(tiny_unet_factory):
    m = tiny_unet_factory()
    with pytest.raises(ValueError, match="multiple of 4"):
        m(torch.randn(1, 5, 8, 10, 8), torch.tensor([1]))
    with pytest.raises(ValueError, match="5 input channels"):
        m(torch.randn(1, 4, 8, 8, 8), torch.tensor([1]))
    with pytest.raises(ValueError, match="method must be one of"):
        UNet3D.from_method("nope")
    with pytest.raises(ValueError, match="divisible by groups"):
        UNet3D(base_width=10, groups=4)


def test_concat_skip_ablation(tiny_unet_factory):
    avg, cat = tiny_unet_factory(), tiny_unet_factory(skip="concat")
    assert count_parameters(cat) > count_parameters(avg)
    assert cat(torch.randn(1, 5, 8, 8, 8), torch.tensor([3])).shape == (1, 1, 8, 8, 8)


def test_timestep_embedding_closed_form():
    t = torch.tensor([0, 7, 999])
    e = timestep_embedding(t, 29).double()
    assert e.shape == (3, 29)
    k = torch.arange(14, dtype=torch.float64)
    freqs = torch.exp(-torch.log(torch.tensor(10000.0, dtype=torch.float64)) * k / 14)
    args = t.double()[:, None] * freqs
    ref = torch.cat([torch.cos(args), torch.sin(args), torch.zeros(3, 1, dtype=torch.float64)], 1)
    assert torch.allclose(e, ref, atol=1e-4)


@pytest.mark.parametrize("mode", ["block", "level"])
def test_checkpointing_matches_plain_gradients(tiny_unet_factory, mode):
    x = torch.randn(1, 5, 8, 8, 8)
    grads = []
    for ckpt in ("none", mode):
        m = tiny_unet_factory(policy=ExecutionPolicy(recompute=ckpt))
        torch.nn.init.normal_(m.conv_out.weight, std=0.1)  # make every gradient non-trivial
        for blk in m.modules():
            if hasattr(blk, "conv2"):
                torch.nn.init.normal_(blk.conv2.weight, std=0.05)
        m(x, torch.tensor([10])).square().sum().backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_stages_are_the_whole_network_once(tiny_unet_factory):
    """UNet3D.stages (what the forward iterates and the tiled executor walks) holds every
    module outside the time embedding exactly once, in forward order."""
    m = tiny_unet_factory()
    kinds = [s.kind for s in m.stages]
    assert kinds == (["input"] + ["encoder"] * m.levels + ["middle"] * len(m.middle)
                     + ["decoder"] * m.levels + ["output"])
    params = [id(p) for s in m.stages for mod in s.modules for p in mod.parameters()]
    params += [id(p) for p in m.time_embed.parameters()]
    assert sorted(params) == sorted(id(p) for p in m.parameters())
    assert not any(name.startswith("stages") for name, _ in m.named_parameters())  # state dict unchanged
