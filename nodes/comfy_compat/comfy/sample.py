"""`comfy.sample`: the initial noise of ComfyUI's samplers (ours, seed for seed) and the empty-latent channel fix.

`sample` / `sample_custom` take ComfyUI's sampler internals (a ModelPatcher and raw conditioning lists); packs
that sample should call `nodes.common_ksampler` or `nodes.KSampler`, which run our sampler. They raise a clear
error here instead of a missing attribute.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ...diffusion.noise import initial_noise


def prepare_noise(latent_image: torch.Tensor, seed: int, noise_inds: Sequence[int] | None = None) -> torch.Tensor:
    """The noise KSampler starts from for `latent_image` (ComfyUI's CPU generator per seed and batch index)."""
    return initial_noise(latent_image, seed, noise_inds)


def fix_empty_latent_channels(model: Any, latent_image: torch.Tensor) -> torch.Tensor:
    """An all-zero latent gets the model's latent channel count (ComfyUI's behaviour for empty latents)."""
    channels = getattr(getattr(getattr(model, "model", None), "latent_format", None), "latent_channels", None)
    if channels and latent_image.ndim >= 2 and latent_image.shape[1] != channels \
            and torch.count_nonzero(latent_image) == 0:
        return latent_image.new_zeros((latent_image.shape[0], channels, *latent_image.shape[2:]))
    return latent_image


def _unsupported(name: str) -> Any:
    def call(*args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"comfy.sample.{name} runs ComfyUI's own sampler internals, which latentloom does "
                                  "not provide; call nodes.common_ksampler or nodes.KSamplerAdvanced instead")
    call.__name__ = name
    return call


sample = _unsupported("sample")
sample_custom = _unsupported("sample_custom")
