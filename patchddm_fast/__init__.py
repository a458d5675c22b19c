"""patchddm_fast: memory-optimised 3D denoising diffusion models for medical image segmentation."""
from patchddm_fast.nn.unet import UNet3D

__version__ = "0.1.0"
__all__ = ["UNet3D"]
