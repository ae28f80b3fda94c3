"""SA-Solver: stochastic Adams predictor-corrector in data-prediction form (arXiv 2309.05019).

Coefficients integrate Lagrange polynomials through the recent predictions against exp((1+τ²)λ) over each step
in λ = −log σ. Noise (strength τ) is on only while percent_to_sigma(0.2) ≥ σ ≥ percent_to_sigma(0.8), as in
ComfyUI; sa_solver_pece re-evaluates the model after each correction.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .noise import DeviceNoise
from .sampler_steps import batch_ones, lambda_of, report, seed_of


def _exponential_moments(s: torch.Tensor, t: torch.Tensor, order: int, tau: float) -> torch.Tensor:
    """(1+τ²)·∫_s^t e^{(1+τ²)(x−t)} x^p dx for p = 0..order−1, by repeated integration by parts."""
    tau_mul = 1 + tau ** 2
    h = t - s
    p = torch.arange(order, dtype=s.dtype, device=s.device)
    boundary = t ** p - s ** p * (-tau_mul * h).exp()
    depth = p.unsqueeze(1) - p.unsqueeze(0)
    log_factorial = (p + 1).lgamma()
    log_coeff = log_factorial.unsqueeze(1) - log_factorial.unsqueeze(0)
    if tau > 0:
        log_coeff = log_coeff - depth * math.log(tau_mul)
    signs = torch.where(depth % 2 == 0, 1.0, -1.0)
    return (log_coeff.exp() * signs).tril() @ boundary


def _adams_coefficients(sigma_next: torch.Tensor, nodes: torch.Tensor, lambda_s: torch.Tensor,
                        lambda_t: torch.Tensor, tau: float) -> torch.Tensor:
    """Weights b_j of the predictions at λ = nodes[j] for the step λ_s → λ_t."""
    moments = _exponential_moments(lambda_s, lambda_t, nodes.shape[0], tau)
    vandermonde_t = torch.vander(nodes, nodes.shape[0], increasing=True).T
    return sigma_next * lambda_t.exp() * torch.linalg.solve(vandermonde_t, moments)


def _tau_window(start_sigma: float, end_sigma: float) -> Callable[[torch.Tensor], float]:
    return lambda sigma: 1.0 if start_sigma >= float(sigma) >= end_sigma else 0.0


def sa_solver(model, x, sigmas, extra_args=None, callback=None, tau_func=None, s_noise=1.0, noise=None,
              predictor_order=3, corrector_order=4, use_pece=False):
    if len(sigmas) <= 1:
        return x
    extra_args = extra_args or {}
    noise_source = noise or DeviceNoise(x, seed_of(extra_args))
    lambdas = lambda_of(sigmas)
    if tau_func is None:
        from .schedules import DiscreteSchedule

        schedule = getattr(model, "schedule", None) or DiscreteSchedule()
        tau_func = _tau_window(schedule.percent_to_sigma(0.2), schedule.percent_to_sigma(0.8))
    keep = max(predictor_order, corrector_order)
    x_pred = x
    h, tau, last_noise = 0.0, 0.0, 0.0
    predictions: list[torch.Tensor] = []
    taper = sigmas[-1].item() == 0  # lower the orders towards a final sigma of 0
    for i in range(len(sigmas) - 1):
        denoised = model(x_pred, sigmas[i] * batch_ones(x), **extra_args)
        report(callback, i, denoised, x_pred)
        predictions = (predictions + [denoised])[-keep:]
        p_order = min(predictor_order, len(predictions))
        c_order = 0 if i == 0 or (sigmas[i + 1] == 0 and not use_pece) else min(corrector_order, len(predictions))
        if taper:
            p_order = min(p_order, len(sigmas) - 2 - i)
            c_order = min(c_order, len(sigmas) - 1 - i)

        if c_order == 0:
            x = x_pred
        else:  # corrector: re-integrate the last step including the new prediction
            b = _adams_coefficients(sigmas[i], lambdas[i - c_order + 1:i + 1], lambdas[i - 1], lambdas[i], tau)
            stacked = torch.stack(predictions[-c_order:], dim=1)
            x = sigmas[i] / sigmas[i - 1] * (-(tau ** 2) * h).exp() * x + torch.tensordot(stacked, b, dims=([1], [0]))
            if tau > 0 and s_noise > 0:
                x = x + last_noise
            if use_pece:
                denoised = model(x, sigmas[i] * batch_ones(x), **extra_args)
                predictions[-1] = denoised

        if sigmas[i + 1] == 0:
            x_pred = denoised
            continue
        tau = tau_func(sigmas[i + 1])
        b = _adams_coefficients(sigmas[i + 1], lambdas[i - p_order + 1:i + 1], lambdas[i], lambdas[i + 1], tau)
        stacked = torch.stack(predictions[-p_order:], dim=1)
        h = lambdas[i + 1] - lambdas[i]
        x_pred = sigmas[i + 1] / sigmas[i] * (-(tau ** 2) * h).exp() * x + torch.tensordot(stacked, b, dims=([1], [0]))
        if tau > 0 and s_noise > 0:
            last_noise = (noise_source(sigmas[i], sigmas[i + 1]) * sigmas[i + 1]
                          * (-2 * tau ** 2 * h).expm1().neg().sqrt() * s_noise)
            x_pred = x_pred + last_noise
    return x_pred
