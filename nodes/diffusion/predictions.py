"""What a network's output means: the prediction types of ComfyUI's model_sampling (EPS, V_PREDICTION, EDM, X0,
IMG_TO_IMG, the LCM boundary condition, COSMOS_RFLOW, CONST for flow matching), as small typed classes.

Samplers work in the variance-exploding space: x = x0 + σ·ε. Each type says how that x is scaled before the
network sees it (`calculate_input`), how the network's output becomes the denoised estimate x0
(`calculate_denoised`), and how the starting latent is noised (`noise_scaling`). σ_data is the data's standard
deviation the preconditioning assumes (1 for SD-family models, 0.5 for EDM models).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch


def broadcast_sigma(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """σ [N] (or a single value) shaped to broadcast against a batch like `like` [N, C, ...]."""
    return sigma.reshape((-1,) + (1,) * (like.ndim - 1))


@dataclass(frozen=True)
class EpsPrediction:
    """The network predicts the noise ε: x0 = x − σ·ε̂; input scaled by 1/√(σ² + σ_data²)."""

    sigma_data: float = 1.0
    name: ClassVar[str] = "eps"
    # Whether calculate_denoised reads the network timestep (the LCM boundary condition does).
    needs_timestep: ClassVar[bool] = False

    def calculate_input(self, sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        sigma = broadcast_sigma(sigma, x)
        return x / (sigma ** 2 + self.sigma_data ** 2) ** 0.5

    def calculate_denoised(self, sigma: torch.Tensor, output: torch.Tensor, x: torch.Tensor,
                           timestep: torch.Tensor | None = None) -> torch.Tensor:
        return x - output * broadcast_sigma(sigma, output)

    def noise_scaling(self, sigma: torch.Tensor, noise: torch.Tensor, latent: torch.Tensor,
                      max_denoise: bool = False) -> torch.Tensor:
        """The sampler's starting point: the latent plus σ·noise, or √(1 + σ²)·noise from the top of the schedule
        (where the latent is pure noise at unit variance)."""
        sigma = broadcast_sigma(sigma, noise)
        scaled = noise * torch.sqrt(1.0 + sigma ** 2.0) if max_denoise else noise * sigma
        return scaled + latent

    def inverse_noise_scaling(self, sigma: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        return latent


@dataclass(frozen=True)
class VPrediction(EpsPrediction):
    """The network predicts v = α·ε − σ'·x0 (Salimans & Ho 2022), preconditioned with σ_data."""

    name: ClassVar[str] = "v"

    def calculate_denoised(self, sigma: torch.Tensor, output: torch.Tensor, x: torch.Tensor,
                           timestep: torch.Tensor | None = None) -> torch.Tensor:
        sigma = broadcast_sigma(sigma, output)
        data2 = self.sigma_data ** 2
        return x * data2 / (sigma ** 2 + data2) - output * sigma * self.sigma_data / (sigma ** 2 + data2) ** 0.5


@dataclass(frozen=True)
class EDMPrediction(VPrediction):
    """Karras et al. 2022's preconditioning: x0 = c_skip·x + c_out·F with c_out = +σ·σ_data/√(σ² + σ_data²)."""

    name: ClassVar[str] = "edm"

    def calculate_denoised(self, sigma: torch.Tensor, output: torch.Tensor, x: torch.Tensor,
                           timestep: torch.Tensor | None = None) -> torch.Tensor:
        sigma = broadcast_sigma(sigma, output)
        data2 = self.sigma_data ** 2
        return x * data2 / (sigma ** 2 + data2) + output * sigma * self.sigma_data / (sigma ** 2 + data2) ** 0.5


@dataclass(frozen=True)
class X0Prediction(EpsPrediction):
    """The network predicts x0 itself."""

    name: ClassVar[str] = "x0"

    def calculate_denoised(self, sigma: torch.Tensor, output: torch.Tensor, x: torch.Tensor,
                           timestep: torch.Tensor | None = None) -> torch.Tensor:
        return output


@dataclass(frozen=True)
class ImgToImgPrediction(X0Prediction):
    """Predicts x0 from the unscaled input (image-to-image models)."""

    name: ClassVar[str] = "img_to_img"

    def calculate_input(self, sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x


@dataclass(frozen=True)
class LCMPrediction(EpsPrediction):
    """Latent Consistency Models (Luo et al. 2023): the ε estimate's x0 blended with x by the consistency
    boundary condition at the network timestep t: c_skip = σ_d²/((10t)² + σ_d²), c_out = 10t/√((10t)² + σ_d²),
    σ_d = 0.5 (so at t = 0 the model is the identity)."""

    name: ClassVar[str] = "lcm"
    needs_timestep: ClassVar[bool] = True
    boundary_sigma_data: ClassVar[float] = 0.5
    timestep_scaling: ClassVar[float] = 10.0

    def boundary_scalings(self, timestep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(c_skip, c_out) at the network timestep."""
        scaled = timestep * self.timestep_scaling
        data2 = self.boundary_sigma_data ** 2
        return data2 / (scaled ** 2 + data2), scaled / (scaled ** 2 + data2) ** 0.5

    def calculate_denoised(self, sigma: torch.Tensor, output: torch.Tensor, x: torch.Tensor,
                           timestep: torch.Tensor | None = None) -> torch.Tensor:
        if timestep is None:
            raise ValueError("the LCM prediction needs the network timestep")
        x0 = x - output * broadcast_sigma(sigma, output)
        c_skip, c_out = self.boundary_scalings(broadcast_sigma(timestep.to(output.dtype), output))
        return c_out * x0 + c_skip * x


@dataclass(frozen=True)
class CosmosRFlowPrediction(EpsPrediction):
    """Cosmos' rectified flow in the VE parametrisation: with s = σ/(σ + 1) the network sees x·(1 − s) and
    predicts the velocity: x0 = x·(1 − s) − output·s."""

    name: ClassVar[str] = "cosmos_rflow"

    def calculate_input(self, sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        s = broadcast_sigma(sigma / (sigma + 1), x)
        return x * (1.0 - s)

    def calculate_denoised(self, sigma: torch.Tensor, output: torch.Tensor, x: torch.Tensor,
                           timestep: torch.Tensor | None = None) -> torch.Tensor:
        s = broadcast_sigma(sigma / (sigma + 1), output)
        return x * (1.0 - s) - output * s

    def noise_scaling(self, sigma: torch.Tensor, noise: torch.Tensor, latent: torch.Tensor,
                      max_denoise: bool = False) -> torch.Tensor:
        return noise * broadcast_sigma(sigma, noise) + latent  # never the √(1 + σ²) start


@dataclass(frozen=True)
class ConstPrediction(EpsPrediction):
    """Flow matching (rectified flow: SD3, Flux, AuraFlow, ...): x = (1 − σ)·x0 + σ·ε with σ in [0, 1]; the
    network sees x as it is and predicts the velocity v = ε − x0, so x0 = x − σ·v."""

    name: ClassVar[str] = "const"

    def calculate_input(self, sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x

    def noise_scaling(self, sigma: torch.Tensor, noise: torch.Tensor, latent: torch.Tensor,
                      max_denoise: bool = False) -> torch.Tensor:
        sigma = broadcast_sigma(sigma, noise)
        return sigma * noise + (1.0 - sigma) * latent  # an interpolation: never the √(1 + σ²) start

    def inverse_noise_scaling(self, sigma: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        return latent / (1.0 - broadcast_sigma(sigma, latent))


Prediction = EpsPrediction  # the base type every prediction derives from

PREDICTIONS: dict[str, type[EpsPrediction]] = {
    cls.name: cls for cls in (EpsPrediction, VPrediction, EDMPrediction, X0Prediction, ImgToImgPrediction,
                              LCMPrediction, CosmosRFlowPrediction, ConstPrediction)
}


def prediction_for(name: str, sigma_data: float = 1.0) -> EpsPrediction:
    try:
        return PREDICTIONS[name](sigma_data=sigma_data)
    except KeyError:
        raise ValueError(f"unknown prediction type {name!r} (known: {', '.join(PREDICTIONS)})") from None
