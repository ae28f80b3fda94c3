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


# --- flow-matching (CONST) models: ComfyUI gives some samplers another λ and a rectified-flow ancestral step ---

def is_flow(model: object) -> bool:
    """Whether the denoiser the sampler calls drives a flow-matching model (x = (1 − σ)·x0 + σ·ε); read from the
    schedule the denoisers carry as `.schedule`."""
    prediction = getattr(getattr(model, "schedule", None), "prediction", None)
    return getattr(prediction, "name", None) == "const"


def half_log_snr(sigma: torch.Tensor, flow: bool) -> torch.Tensor:
    """λ = log(α/σ): −log σ for the VE models, log((1 − σ)/σ) for flow models."""
    return sigma.logit().neg() if flow else sigma.log().neg()


def sigma_at_half_log_snr(half_log_snr_value: torch.Tensor, flow: bool) -> torch.Tensor:
    return half_log_snr_value.neg().sigmoid() if flow else half_log_snr_value.neg().exp()


def snr_safe_sigmas(sigmas: torch.Tensor, model: object, percent_offset: float = 1e-4) -> torch.Tensor:
    """A flow schedule starting at σ ≥ 1 (λ = −∞) starts a little below it instead: percent_to_sigma(1e-4)."""
    if len(sigmas) <= 1 or not is_flow(model) or not sigmas[0] >= 1:
        return sigmas
    sigmas = sigmas.clone()
    sigmas[0] = model.schedule.percent_to_sigma(percent_offset)  # type: ignore[attr-defined]
    return sigmas


def flow_ancestral_step(sigma: torch.Tensor, sigma_next: torch.Tensor, eta: float):
    """The rectified-flow ancestral split: (σ_down, the rescale α_next/α_down, the fresh-noise weight)."""
    sigma_down = sigma_next * (1 + (sigma_next / sigma - 1) * eta)
    alpha_next, alpha_down = 1 - sigma_next, 1 - sigma_down
    renoise = (sigma_next ** 2 - sigma_down ** 2 * alpha_next ** 2 / alpha_down ** 2) ** 0.5
    return sigma_down, alpha_next / alpha_down, renoise
