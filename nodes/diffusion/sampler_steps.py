"""Small pieces every sampler shares (k-diffusion conventions)."""

from __future__ import annotations

from collections.abc import Callable

import torch

# callback(i, denoised, x), once per step.
Callback = Callable[[int, torch.Tensor, torch.Tensor], None]


def batch_ones(x: torch.Tensor) -> torch.Tensor:
    """Multiply a scalar sigma by this to get one sigma per batch item."""
    return x.new_ones([x.shape[0]])


def seed_of(extra_args: dict) -> int | None:
    return extra_args.get("seed")


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """The probability-flow ODE derivative dx/dσ = (x − D)/σ."""
    return (x - denoised) / sigma


def report(callback: Callback | None, i: int, denoised: torch.Tensor, x: torch.Tensor) -> None:
    if callback is not None:
        callback(i, denoised, x)


def ancestral_step(sigma: torch.Tensor, sigma_next: torch.Tensor, eta: float = 1.0):
    """Split the step to sigma_next into a deterministic part down to sigma_down and fresh noise sigma_up."""
    if not eta:
        return sigma_next, 0.0
    sigma_up = min(sigma_next, eta * (sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2) ** 0.5)
    sigma_down = (sigma_next ** 2 - sigma_up ** 2) ** 0.5
    return sigma_down, sigma_up


def sigma_of(t: torch.Tensor) -> torch.Tensor:
    """σ from λ = −log σ (half log-SNR of eps models)."""
    return t.neg().exp()


def lambda_of(sigma: torch.Tensor) -> torch.Tensor:
    return sigma.log().neg()
