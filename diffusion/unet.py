"""The UNet's import path before the package had sub-packages. Models exported then name
`diffusion.unet` in their model_index.json; this keeps them loading. New code imports
`diffusion.model.unet`."""

from diffusers.models.modeling_utils import ModelMixin  # diffusers looks up the loading base class here

from diffusion.model.unet import UNet

__all__ = ["ModelMixin", "UNet"]
