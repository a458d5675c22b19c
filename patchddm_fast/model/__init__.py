from patchddm_fast.model.unet import UNet3D, count_parameters, timestep_embedding

__all__ = ["UNet3D", "count_parameters", "timestep_embedding"]
