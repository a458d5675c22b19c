import os

import pytest
import torch

# Two cores are shared by the whole suite: keep torch from oversubscribing them.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def tiny_unet_kwargs(in_channels: int = 5) -> dict:
    """A 3-level UNet3D small enough for CPU tests (size multiple 4)."""
    return dict(in_channels=in_channels, base_width=8, channel_mult=(1, 2, 2), enc_blocks=1, dec_blocks=2,
                mid_blocks=1, groups=4)


@pytest.fixture
def tiny_unet_factory():
    from patchddm_fast import UNet3D

    def make(**overrides):
        torch.manual_seed(0)
        return UNet3D(**{**tiny_unet_kwargs(), **overrides})

    return make
