"""patchddm_fast: memory-optimised 3D denoising diffusion models for medical image segmentation.

>>> from patchddm_fast import Trainer, TrainConfig, UNet3D
"""
from patchddm_fast.config import TrainConfig
from patchddm_fast.diffusion.schedule import Diffusion
from patchddm_fast.model.unet import UNet3D

__version__ = "0.1.0"
__all__ = ["Diffusion", "TrainConfig", "Trainer", "UNet3D", "segment_volume"]


def __getattr__(name):
    # Trainer and the sampler pull in data/metrics modules; import them on first use.
    if name == "Trainer":
        from patchddm_fast.training.trainer import Trainer

        return Trainer
    if name == "segment_volume":
        from patchddm_fast.sampling.segment import segment_volume

        return segment_volume
    raise AttributeError(name)
