"""Text-to-image diffusion models behind one interface (world model and Stable Diffusion)."""

from cul.models.diffusion import (
    DiffusionModel,
    SamplingConfig,
    StableDiffusion,
    WorldDiffusion,
    WorldUNetConfig,
    load_model,
)

__all__ = [
    "DiffusionModel",
    "SamplingConfig",
    "StableDiffusion",
    "WorldDiffusion",
    "WorldUNetConfig",
    "load_model",
]
