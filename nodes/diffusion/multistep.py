"""Multistep samplers that reuse earlier derivatives or predictions: LMS, iPNDM, gradient estimation, RES and
ER-SDE (same call convention as nodes.diffusion.samplers)."""

from __future__ import annotations

import torch

from .noise import DeviceNoise
from .sampler_steps import (
    ancestral_step,
    batch_ones,
    half_log_snr,
    is_flow,
    lambda_of,
    report,
    seed_of,
    sigma_of,
    snr_safe_sigmas,
    to_d,
)


def _lms_coefficient(order: int, sigmas, i: int, j: int) -> float:
    """∫ over [σ_i, σ_i+1] of the Lagrange basis polynomial j through the last `order` sigmas."""
    from scipy import integrate

    def basis(tau):
        product = 1.0
        for k in range(order):
            if k != j:
                product *= (tau - sigmas[i - k]) / (sigmas[i - j] - sigmas[i - k])
        return product

    return integrate.quad(basis, sigmas[i], sigmas[i + 1], epsrel=1e-4)[0]


def lms(model, x, sigmas, extra_args=None, callback=None, order=4):
    extra_args = extra_args or {}
    sigmas_cpu = sigmas.detach().cpu().numpy()
    history: list[torch.Tensor] = []
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * batch_ones(x), **extra_args)
        history.append(to_d(x, sigmas[i], denoised))
        if len(history) > order:
            history.pop(0)
        report(callback, i, denoised, x)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            current_order = min(i + 1, order)
            coefficients = [_lms_coefficient(current_order, sigmas_cpu, i, j) for j in range(current_order)]
            x = x + sum(c * d for c, d in zip(coefficients, reversed(history), strict=False))
    return x


def ipndm(model, x, sigmas, extra_args=None, callback=None, max_order=4):
    """Improved PNDM: Adams–Bashforth on d with fixed-step coefficients, order rising to 4."""
    extra_args = extra_args or {}
    history: list[torch.Tensor] = []
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * batch_ones(x), **extra_args)
        report(callback, i, denoised, x)
        d = (x - denoised) / sigma
        order = min(max_order, i + 1)
        dt = sigma_next - sigma
        if order == 1:
            x_next = x + dt * d
        elif order == 2:
            x_next = x + dt * (3 * d - history[-1]) / 2
        elif order == 3:
            x_next = x + dt * (23 * d - 16 * history[-1] + 5 * history[-2]) / 12
        else:
            x_next = x + dt * (55 * d - 59 * history[-1] + 37 * history[-2] - 9 * history[-3]) / 24
        history = (history + [d])[-(max_order - 1):]
        x = x_next
    return x


def _ipndm_v_coefficients(h: list, order: int) -> list:
    """Variable-step Adams–Bashforth weights for [d_i, d_i−1, ...]; h[0] = σ_i+1 − σ_i, h[k] = σ_i−k+1 − σ_i−k."""
    if order == 2:
        return [(2 + h[0] / h[1]) / 2, -(h[0] / h[1]) / 2]
    h0, h1, h2 = h[0], h[1], h[2]
    temp1 = (1 - h0 / (3 * (h0 + h1)) * (h0 * (h0 + h1)) / (h1 * (h1 + h2))) / 2
    if order == 3:
        return [(2 + h0 / h1) / 2 + temp1, -(h0 / h1) / 2 - (1 + h1 / h2) * temp1, temp1 * h1 / h2]
    h3 = h[3]
    temp2 = ((1 - h0 / (3 * (h0 + h1))) / 2 + (1 - h0 / (2 * (h0 + h1))) * h0 / (6 * (h0 + h1 + h2))) \
        * (h0 * (h0 + h1) * (h0 + h1 + h2)) / (h1 * (h1 + h2) * (h1 + h2 + h3))
    ratio = h1 * (h1 + h2) / (h2 * (h2 + h3))
    return [(2 + h0 / h1) / 2 + temp1 + temp2,
            -(h0 / h1) / 2 - (1 + h1 / h2) * temp1 - (1 + h1 / h2 + ratio) * temp2,
            temp1 * h1 / h2 + (h1 / h2 + ratio * (1 + h2 / h3)) * temp2,
            -temp2 * ratio * h1 / h2]


def ipndm_v(model, x, sigmas, extra_args=None, callback=None, max_order=4):
    """iPNDM with variable-step coefficients (Adams–Bashforth weights for uneven sigma spacing)."""
    extra_args = extra_args or {}
    history: list[torch.Tensor] = []
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * batch_ones(x), **extra_args)
        report(callback, i, denoised, x)
        d = (x - denoised) / sigma
        order = min(max_order, i + 1)
        if order == 1:
            x_next = x + (sigma_next - sigma) * d
        else:
            steps = [sigma_next - sigma] + [sigmas[i - k] - sigmas[i - k - 1] for k in range(order - 1)]
            weights = _ipndm_v_coefficients(steps, order)
            combined = weights[0] * d
            for k in range(1, order):
                combined = combined + weights[k] * history[-k]
            x_next = x + (sigma_next - sigma) * combined
        history = (history + [d])[-(max_order - 1):]
        x = x_next
    return x


def gradient_estimation(model, x, sigmas, extra_args=None, callback=None, ge_gamma=2.0, cfg_pp=False):
    """Euler plus (γ − 1)·(d − d_prev)·dt; the last step lands on D."""
    extra_args = extra_args or {}
    old_d = None
    for i in range(len(sigmas) - 1):
        if cfg_pp:
            denoised, uncond = model(x, sigmas[i] * batch_ones(x), return_uncond=True, **extra_args)
            d = to_d(x, sigmas[i], uncond)
        else:
            denoised = model(x, sigmas[i] * batch_ones(x), **extra_args)
            d = to_d(x, sigmas[i], denoised)
        report(callback, i, denoised, x)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            x = denoised + d * sigmas[i + 1] if cfg_pp else x + d * dt
            if old_d is not None:  # from the second step on
                x = x + (ge_gamma - 1) * (d - old_d) * dt
        old_d = d
    return x


def res_multistep(model, x, sigmas, extra_args=None, callback=None, s_noise=1.0, noise=None, eta=1.0,
                  cfg_pp=False):
    """RES second-order exponential multistep (arXiv 2308.02157); eta > 0 adds ancestral noise."""
    extra_args = extra_args or {}
    noise = noise or DeviceNoise(x, seed_of(extra_args))
    old_sigma_down = old_denoised = None
    for i in range(len(sigmas) - 1):
        if cfg_pp:
            denoised, uncond = model(x, sigmas[i] * batch_ones(x), return_uncond=True, **extra_args)
        else:
            denoised = uncond = model(x, sigmas[i] * batch_ones(x), **extra_args)
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        report(callback, i, denoised, x)
        if sigma_down == 0 or old_denoised is None or old_sigma_down is None:  # (both None on the first step)
            if cfg_pp:
                x = denoised + to_d(x, sigmas[i], uncond) * sigma_down
            else:
                x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        else:
            t, t_old = lambda_of(sigmas[i]), lambda_of(old_sigma_down)
            t_next, t_prev = lambda_of(sigma_down), lambda_of(sigmas[i - 1])
            h = t_next - t
            c2 = (t_prev - t_old) / h
            phi1 = torch.expm1(-h) / -h
            phi2 = (phi1 - 1.0) / -h
            b1 = torch.nan_to_num(phi1 - phi2 / c2, nan=0.0)
            b2 = torch.nan_to_num(phi2 / c2, nan=0.0)
            if cfg_pp:
                x = x + (denoised - uncond)
            x = sigma_of(h) * x + h * (b1 * uncond + b2 * old_denoised)
        if sigmas[i + 1] > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
        old_denoised = uncond
        old_sigma_down = sigma_down
    return x


def _er_noise_scaler(v: torch.Tensor) -> torch.Tensor:
    return v * ((v ** 0.3).exp() + 10.0)


def reverse_time_sde_noise_scaler(v: torch.Tensor, eta: float) -> torch.Tensor:
    """ER-SDE's noise scaler for the plain reverse-time SDE (eta > 0) or the ODE (eta = 0): v^(eta + 1)."""
    return v ** (eta + 1)


def er_sde(model, x, sigmas, extra_args=None, callback=None, s_noise=1.0, noise=None, noise_scaler=None,
           max_stage=3):
    """ER-SDE-Solver-3 (arXiv 2309.06169): up to third order, integrals by 200-point Riemann sums.
    `noise_scaler(v)` picks the SDE (default: the paper's v·(e^(v^0.3) + 10))."""
    extra_args = extra_args or {}
    scaler = noise_scaler or _er_noise_scaler
    noise = noise or DeviceNoise(x, seed_of(extra_args))
    points = 200.0
    offsets = torch.arange(0, points, dtype=torch.float32, device=x.device)
    sigmas = snr_safe_sigmas(sigmas, model)
    # σ/α: σ itself for eps models (via the same rounding path as ComfyUI), σ/(1 − σ) for flow models
    er_lambdas = half_log_snr(sigmas, is_flow(model)).neg().exp()
    old_denoised = old_denoised_d = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * batch_ones(x), **extra_args)
        report(callback, i, denoised, x)
        stage = min(max_stage, i + 1)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            lambda_s, lambda_t = er_lambdas[i], er_lambdas[i + 1]
            alpha_s, alpha_t = sigmas[i] / lambda_s, sigmas[i + 1] / lambda_t
            r = scaler(lambda_t) / scaler(lambda_s)
            x = (alpha_t / alpha_s) * r * x + alpha_t * (1 - r) * denoised
            if stage >= 2:
                dt = lambda_t - lambda_s
                step = -dt / points
                positions = lambda_t + offsets * step
                scaled = scaler(positions)
                s = torch.sum(1 / scaled) * step
                denoised_d = (denoised - old_denoised) / (lambda_s - er_lambdas[i - 1])
                x = x + alpha_t * (dt + s * scaler(lambda_t)) * denoised_d
                if stage >= 3:
                    s_u = torch.sum((positions - lambda_s) / scaled) * step
                    denoised_u = (denoised_d - old_denoised_d) / ((lambda_s - er_lambdas[i - 2]) / 2)
                    x = x + alpha_t * ((dt ** 2) / 2 + s_u * scaler(lambda_t)) * denoised_u
                old_denoised_d = denoised_d
            if s_noise > 0:
                spread = (lambda_t ** 2 - lambda_s ** 2 * r ** 2).sqrt().nan_to_num(nan=0.0)
                x = x + alpha_t * noise(sigmas[i], sigmas[i + 1]) * s_noise * spread
        old_denoised = denoised
    return x
