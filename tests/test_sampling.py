"""Whole-volume sampling: padding to the network's multiple and back, ensemble statistics,
and the summary the demo and `patchddm sample` write."""
import numpy as np
import pytest
import torch

from patchddm_fast.diffusion.schedule import Diffusion
from patchddm_fast.model.unet import UNet3D
from patchddm_fast.sampling.segment import segment_volume
from patchddm_fast.cli.showcase import format_table
from patchddm_fast.eval.scoring import summarise

TINY = dict(base_width=8, channel_mult=(1, 2, 2), enc_blocks=1, dec_blocks=2, mid_blocks=1, groups=4)


@pytest.mark.parametrize("method,in_channels", [("patchddm", 8), ("halfres", 5), ("fullres", 5)])
def test_any_volume_size_comes_back_on_its_own_grid_with_ensemble_statistics(method, in_channels):
    torch.manual_seed(0)
    model = UNet3D(in_channels=in_channels, **TINY)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    image = torch.rand(4, 10, 7, 5, generator=torch.Generator().manual_seed(1))  # no axis a multiple of 4
    res = segment_volume(model, Diffusion(), image, method=method, ensemble=3, steps=2, seed=5, progress=False,
                         keep_samples=True)
    assert res.samples.shape == (3, 10, 7, 5) and res.mean.shape == res.var.shape == res.mask.shape == (10, 7, 5)
    torch.testing.assert_close(res.mean, res.samples.mean(0))
    torch.testing.assert_close(res.var, res.samples.var(0, unbiased=False))
    assert torch.equal(res.mask, res.mean > 0.5) and res.mask.dtype == torch.bool
    assert (res.samples[0] != res.samples[1]).any()  # members start from different noise
    again = segment_volume(model, Diffusion(), image, method=method, ensemble=3, steps=2, seed=5, progress=False)
    assert torch.equal(again.mean, res.mean)  # the ensemble is a function of the seed


@pytest.mark.parametrize("method,in_channels", [("patchddm", 8), ("fullres", 5)])
def test_padded_fp32_sampling_equals_the_plain_member_loop(method, in_channels):
    """segment_volume (device side in sample_batches, frees and all) gives, in fp32 on the CPU,
    bit for bit what a plain loop gives: pad, condition, one seeded generator drawing each
    member's noise, DDIM through the network, crop."""
    from patchddm_fast.data.patches import pad_to_multiple, unpad
    from patchddm_fast.model.conditioning import condition, network_input

    torch.manual_seed(0)
    model = UNet3D(in_channels=in_channels, **TINY).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    diffusion, image = Diffusion(), torch.rand(4, 10, 7, 5, generator=torch.Generator().manual_seed(1))
    padded, spec = pad_to_multiple(image, model.size_multiple)
    cond = condition(padded, method)[None]
    gen = torch.Generator().manual_seed(9)
    reference = []
    with torch.no_grad():
        for _ in range(3):
            noise = torch.randn((1, 1, *cond.shape[-3:]), generator=gen)
            *_, (_, x, _) = diffusion.ddim_loop(lambda x, t: model(network_input(cond, x), t).float(), noise.shape, 3,
                                               generator=gen, noise=noise)
            reference.append(unpad(x[0, 0], spec))
    res = segment_volume(model, diffusion, image, method=method, ensemble=3, steps=3, seed=9, progress=False,
                         keep_samples=True)
    assert torch.equal(res.samples, torch.stack(reference))


def test_summary_always_has_dice_and_hd95_and_never_nan():
    records = [dict(case="a", dice=0.0, hd95=None, dice_single_sample=0.0),
               dict(case="b", dice=0.5, hd95=None, dice_single_sample=0.25)]
    s = summarise(records)
    assert s["dice"] == 0.25 and s["hd95"] is None and s["n_hd95_infinite"] == 2
    table = format_table(dict(cases=records, mean=s))
    assert "nan" not in table and "inf (every case)" in table
    s = summarise([dict(case="c", dice=1.0, hd95=2.0, dice_single_sample=1.0)] + records)
    assert s["hd95"] == 2.0 and s["dice"] == pytest.approx(np.mean([1.0, 0.0, 0.5]))
