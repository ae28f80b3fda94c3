"""SA-Solver: stochastic Adams predictor-corrector in data-prediction form (arXiv 2309.05019).

Coefficients integrate Lagrange polynomials through the recent predictions against exp((1+τ²)λ) over each step
in λ = −log σ. Noise (strength τ) is on only while percent_to_sigma(0.2) ≥ σ ≥ percent_to_sigma(0.8), as in
ComfyUI; sa_solver_pece re-evaluates the model after each correction. Like ComfyUI's, it returns the last
corrected state, which lags one step behind on sigmas that do not end at 0.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch

from .noise import DeviceNoise
from .sampler_steps import batch_ones, half_log_snr, is_flow, report, seed_of, snr_safe_sigmas


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
                        lambda_t: torch.Tensor, tau: float, simple_order_2: bool = False,
                        corrector: bool = False) -> torch.Tensor:
    """Weights b_j of the predictions at λ = nodes[j] for the step λ_s → λ_t."""
    if simple_order_2 and nodes.shape[0] == 2:
        return _simple_order_2_coefficients(sigma_next, nodes, lambda_s, lambda_t, tau, corrector)
    moments = _exponential_moments(lambda_s, lambda_t, nodes.shape[0], tau)
    vandermonde_t = torch.vander(nodes, nodes.shape[0], increasing=True).T
    return sigma_next * lambda_t.exp() * torch.linalg.solve(vandermonde_t, moments)


def _simple_order_2_coefficients(sigma_next: torch.Tensor, nodes: torch.Tensor, lambda_s: torch.Tensor,
                                 lambda_t: torch.Tensor, tau: float, corrector: bool) -> torch.Tensor:
    """The paper's simplified second-order weights (its appendix D), [older, newer] prediction."""
    tau_mul = 1 + tau ** 2
    h = lambda_t - lambda_s
    alpha_t = sigma_next * lambda_t.exp()
    whole = alpha_t * (-h * tau_mul).expm1().neg()
    if corrector:
        newer = alpha_t * (0.5 * tau_mul * h)
        older = whole - newer
    else:
        older = alpha_t * (0.5 * tau_mul * h ** 2) / (nodes[-2] - lambda_s)
        newer = whole - older
    return torch.stack([older, newer])


def _tau_in_window(sigma: torch.Tensor | float, start_sigma: float, end_sigma: float, eta: float) -> float:
    if eta <= 0:
        return 0.0
    return eta if start_sigma >= float(sigma) >= end_sigma else 0.0


def tau_interval(start_sigma: float, end_sigma: float, eta: float = 1.0) -> Callable[[torch.Tensor | float], float]:
    """The noise strength τ(σ): eta while start_sigma ≥ σ ≥ end_sigma, else 0 (ComfyUI's SDE window)."""
    return functools.partial(_tau_in_window, start_sigma=start_sigma, end_sigma=end_sigma, eta=eta)


def sa_solver(model, x, sigmas, extra_args=None, callback=None, tau_func=None, s_noise=1.0, noise=None,
              predictor_order=3, corrector_order=4, use_pece=False, simple_order_2=False):
    if len(sigmas) <= 1:
        return x
    extra_args = extra_args or {}
    noise_source = noise or DeviceNoise(x, seed_of(extra_args))
    sigmas = snr_safe_sigmas(sigmas, model)
    lambdas = half_log_snr(sigmas, is_flow(model))  # flow models: log((1 − σ)/σ)
    if tau_func is None:
        from .schedules import DiscreteSchedule

        schedule = getattr(model, "schedule", None) or DiscreteSchedule()
        tau_func = tau_interval(schedule.percent_to_sigma(0.2), schedule.percent_to_sigma(0.8))
    keep = max(predictor_order, corrector_order)
    x_pred = x
    h: torch.Tensor = sigmas.new_zeros(())  # the last predictor step in λ (the corrector needs it from step 1 on)
    tau = 0.0
    last_noise: torch.Tensor | float = 0.0
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
            b = _adams_coefficients(sigmas[i], lambdas[i - c_order + 1:i + 1], lambdas[i - 1], lambdas[i], tau,
                                    simple_order_2, corrector=True)
            stacked = torch.stack(predictions[-c_order:], dim=1)
            x = sigmas[i] / sigmas[i - 1] * (-(tau ** 2) * h).exp() * x + torch.tensordot(stacked, b, dims=([1], [0]))
            if tau > 0 and s_noise > 0:
                x = x + last_noise
            if use_pece:
                denoised = model(x, sigmas[i] * batch_ones(x), **extra_args)
                predictions[-1] = denoised

        if sigmas[i + 1] == 0:
            x = denoised
            continue
        tau = tau_func(sigmas[i + 1])
        b = _adams_coefficients(sigmas[i + 1], lambdas[i - p_order + 1:i + 1], lambdas[i], lambdas[i + 1], tau,
                                simple_order_2)
        stacked = torch.stack(predictions[-p_order:], dim=1)
        h = lambdas[i + 1] - lambdas[i]
        x_pred = sigmas[i + 1] / sigmas[i] * (-(tau ** 2) * h).exp() * x + torch.tensordot(stacked, b, dims=([1], [0]))
        if tau > 0 and s_noise > 0:
            last_noise = (noise_source(sigmas[i], sigmas[i + 1]) * sigmas[i + 1]
                          * (-2 * tau ** 2 * h).expm1().neg().sqrt() * s_noise)
            x_pred = x_pred + last_noise
    # As ComfyUI: the last corrected state. On sigmas ending at 0 that is the final denoised estimate; on sigmas
    # that do not (the high half of a split schedule) it is the state at sigmas[-2], not the prediction x_pred.
    return x
