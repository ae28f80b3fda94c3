"""The objects that flow through MODEL links, and the latent formats.

Contract shared by the loaders (which build these), the samplers (which call them) and LoRA (which patches
them). CLIP objects live in nodes.diffusion.clip, VAE objects in nodes.diffusion.vae.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch


@dataclass(frozen=True)
class LatentFormat:
    channels: int = 4
    scale_factor: float = 0.18215
    shift_factor: float = 0.0
    # Latent -> RGB projection for live previews: one row per latent channel, three columns (R, G, B).
    rgb_factors: tuple[tuple[float, float, float], ...] | None = None
    rgb_bias: tuple[float, float, float] | None = None

    def process_in(self, latent: torch.Tensor) -> torch.Tensor:
        """Raw VAE latent -> the scaled space the UNet works in."""
        return (latent - self.shift_factor) * self.scale_factor

    def process_out(self, latent: torch.Tensor) -> torch.Tensor:
        return latent / self.scale_factor + self.shift_factor


SD15_LATENT = LatentFormat(
    channels=4, scale_factor=0.18215,
    rgb_factors=((0.3512, 0.2297, 0.3227), (0.3250, 0.4974, 0.2350),
                 (-0.2829, 0.1762, 0.2721), (-0.2120, -0.2616, -0.7177)),
)
SDXL_LATENT = LatentFormat(
    channels=4, scale_factor=0.13025,
    rgb_factors=((0.3651, 0.4232, 0.4341), (-0.2533, -0.0042, 0.1068),
                 (0.1076, 0.1111, -0.0362), (-0.3165, -0.2492, -0.2188)),
    rgb_bias=(0.1084, -0.0175, -0.0011),
)


class WeightPatch(Protocol):
    """A reversible change to a module's weights (LoRA). apply() returns a function that restores exactly."""

    def apply(self, module: torch.nn.Module) -> Any: ...


@dataclass(frozen=True)
class SamplingConfig:
    """The discrete noise schedule the model was trained with (SD1/SD2/SDXL: scaled-linear betas)."""

    beta_start: float = 0.00085
    beta_end: float = 0.012
    timesteps: int = 1000
    prediction: str = "eps"  # "eps" | "v"


@dataclass(frozen=True)
class DiffusionModel:
    """What a MODEL link carries: the denoising network plus how to drive it.

    Cloning (dataclasses.replace / with_patches) shares the network weights; only the patch list differs, so a
    LoRA never leaves a patched model behind for another graph: patches are applied inside `prepared()` and
    restored when it exits.
    """

    unet: torch.nn.Module                    # diffusers UNet2DConditionModel
    family: str                              # "sd1" | "sd2" | "sdxl" | "sdxl_refiner"
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    latent_format: LatentFormat = SD15_LATENT
    source: str = ""                         # file the weights came from (identity for caches and affinity)
    patches: tuple[WeightPatch, ...] = ()
    # Extra per-model options (e.g. sampler hooks) that nodes may add; copied on clone.
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def prediction(self) -> str:
        return self.sampling.prediction

    def with_patches(self, *patches: WeightPatch) -> DiffusionModel:
        return dataclasses.replace(self, patches=self.patches + tuple(patches), options=dict(self.options))

    def cache_nbytes(self) -> int:
        # The weights are owned (and counted) by the model memory manager, not by the output cache.
        return 0

    @contextlib.contextmanager
    def prepared(self, manager: Any = None) -> Iterator[torch.nn.Module]:
        """The network ready to call: on its compute device (through the memory manager when given), with this
        model's patches applied; everything is restored on exit."""
        lease = manager.use(self.unet) if manager is not None else contextlib.nullcontext(self.unet)
        with lease as module:
            restores = []
            try:
                for patch in self.patches:
                    restores.append(patch.apply(module))
                yield module
            finally:
                for restore in reversed(restores):
                    restore()
