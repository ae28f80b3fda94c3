"""k-diffusion-style samplers, with ComfyUI's step rules and noise sources.

Every sampler is a pure function `(model, x, sigmas, extra_args, callback, **options) -> x`:

* `model(x, sigma_batch, **extra_args)` returns the denoised estimate D (the CFG'd x0 prediction) in the
  sampling space; `extra_args["seed"]` seeds the ancestral/SDE noise. Samplers that need the unguided
  prediction (CFG++) call `model(..., return_uncond=True)` and get `(D, D_uncond)`.
* `callback(i, denoised, x)` is called once per step.
* `sigmas` is a float32 1-D tensor on x's device, usually ending in 0.

Notation: d = (x − D)/σ is the ODE derivative in σ; λ = −log σ (half log-SNR for eps models).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping

import torch

from .noise import BrownianNoise, DeviceNoise, brownian_noise_for

Callback = Callable[[int, torch.Tensor, torch.Tensor], None]


def _ones(x: torch.Tensor) -> torch.Tensor:
    return x.new_ones([x.shape[0]])


def _seed(extra_args: dict) -> int | None:
    return extra_args.get("seed")


def _to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    return (x - denoised) / sigma


def _report(callback: Callback | None, i: int, denoised: torch.Tensor, x: torch.Tensor) -> None:
    if callback is not None:
        callback(i, denoised, x)


def ancestral_step(sigma: torch.Tensor, sigma_next: torch.Tensor, eta: float = 1.0):
    """Split the step to sigma_next into a deterministic part down to sigma_down and fresh noise sigma_up."""
    if not eta:
        return sigma_next, 0.0
    sigma_up = min(sigma_next, eta * (sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2) ** 0.5)
    sigma_down = (sigma_next ** 2 - sigma_up ** 2) ** 0.5
    return sigma_down, sigma_up


# --- first-order and Runge-Kutta samplers --------------------------------------------------------------------

def euler(model, x, sigmas, extra_args=None, callback=None):
    extra_args = extra_args or {}
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * _ones(x), **extra_args)
        _report(callback, i, denoised, x)
        x = x + _to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
    return x


def euler_cfg_pp(model, x, sigmas, extra_args=None, callback=None):
    """CFG++: step from the guided x0 along the *unguided* noise direction."""
    extra_args = extra_args or {}
    for i in range(len(sigmas) - 1):
        denoised, uncond = model(x, sigmas[i] * _ones(x), return_uncond=True, **extra_args)
        _report(callback, i, denoised, x)
        x = denoised + _to_d(x, sigmas[i], uncond) * sigmas[i + 1]
    return x


def euler_ancestral(model, x, sigmas, extra_args=None, callback=None, eta=1.0, s_noise=1.0, noise=None):
    extra_args = extra_args or {}
    noise = noise or DeviceNoise(x, _seed(extra_args))
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * _ones(x), **extra_args)
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        _report(callback, i, denoised, x)
        if sigma_down == 0:
            x = denoised
        else:
            d = _to_d(x, sigmas[i], denoised)
            x = x + d * (sigma_down - sigmas[i]) + noise(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


def euler_ancestral_cfg_pp(model, x, sigmas, extra_args=None, callback=None, eta=1.0, s_noise=1.0, noise=None):
    extra_args = extra_args or {}
    noise = noise or DeviceNoise(x, _seed(extra_args))
    for i in range(len(sigmas) - 1):
        denoised, uncond = model(x, sigmas[i] * _ones(x), return_uncond=True, **extra_args)
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        _report(callback, i, denoised, x)
        x = denoised + _to_d(x, sigmas[i], uncond) * sigma_down
        if sigmas[i + 1] > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


def heun(model, x, sigmas, extra_args=None, callback=None):
    extra_args = extra_args or {}
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * _ones(x), **extra_args)
        _report(callback, i, denoised, x)
        d = _to_d(x, sigmas[i], denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = _to_d(x_2, sigmas[i + 1], model(x_2, sigmas[i + 1] * _ones(x), **extra_args))
            x = x + (d + d_2) / 2 * dt
    return x


def heunpp2(model, x, sigmas, extra_args=None, callback=None):
    """Heun++: up to three evaluations per step, the derivatives weighted by their sigma relative to σ_0."""
    extra_args = extra_args or {}
    sigma_end = sigmas[-1]
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * _ones(x), **extra_args)
        _report(callback, i, denoised, x)
        d = _to_d(x, sigmas[i], denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == sigma_end:
            x = x + d * dt
            continue
        x_2 = x + d * dt
        d_2 = _to_d(x_2, sigmas[i + 1], model(x_2, sigmas[i + 1] * _ones(x), **extra_args))
        if sigmas[i + 2] == sigma_end:
            w2 = sigmas[i + 1] / (2 * sigmas[0])
            x = x + (d * (1 - w2) + d_2 * w2) * dt
        else:
            x_3 = x_2 + d_2 * (sigmas[i + 2] - sigmas[i + 1])
            d_3 = _to_d(x_3, sigmas[i + 2], model(x_3, sigmas[i + 2] * _ones(x), **extra_args))
            w = 3 * sigmas[0]
            w2, w3 = sigmas[i + 1] / w, sigmas[i + 2] / w
            x = x + ((1 - w2 - w3) * d + w2 * d_2 + w3 * d_3) * dt
    return x


def dpm_2(model, x, sigmas, extra_args=None, callback=None):
    """DPM-Solver-2: derivative re-evaluated at the log-midpoint sigma."""
    extra_args = extra_args or {}
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * _ones(x), **extra_args)
        _report(callback, i, denoised, x)
        d = _to_d(x, sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = x + d * (sigmas[i + 1] - sigmas[i])
        else:
            sigma_mid = sigmas[i].log().lerp(sigmas[i + 1].log(), 0.5).exp()
            x_2 = x + d * (sigma_mid - sigmas[i])
            d_2 = _to_d(x_2, sigma_mid, model(x_2, sigma_mid * _ones(x), **extra_args))
            x = x + d_2 * (sigmas[i + 1] - sigmas[i])
    return x


def dpm_2_ancestral(model, x, sigmas, extra_args=None, callback=None, eta=1.0, s_noise=1.0, noise=None):
    extra_args = extra_args or {}
    noise = noise or DeviceNoise(x, _seed(extra_args))
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * _ones(x), **extra_args)
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        _report(callback, i, denoised, x)
        d = _to_d(x, sigmas[i], denoised)
        if sigma_down == 0:
            x = x + d * (sigma_down - sigmas[i])
        else:
            sigma_mid = sigmas[i].log().lerp(sigma_down.log(), 0.5).exp()
            x_2 = x + d * (sigma_mid - sigmas[i])
            d_2 = _to_d(x_2, sigma_mid, model(x_2, sigma_mid * _ones(x), **extra_args))
            x = x + d_2 * (sigma_down - sigmas[i])
            x = x + noise(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


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
        denoised = model(x, sigmas[i] * _ones(x), **extra_args)
        history.append(_to_d(x, sigmas[i], denoised))
        if len(history) > order:
            history.pop(0)
        _report(callback, i, denoised, x)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            current_order = min(i + 1, order)
            coefficients = [_lms_coefficient(current_order, sigmas_cpu, i, j) for j in range(current_order)]
            x = x + sum(c * d for c, d in zip(coefficients, reversed(history)))
    return x


# --- DPM-Solver++ family (exponential integrators in λ = −log σ) ---------------------------------------------

def _sigma_of(t: torch.Tensor) -> torch.Tensor:
    return t.neg().exp()


def _t_of(sigma: torch.Tensor) -> torch.Tensor:
    return sigma.log().neg()


def dpmpp_2s_ancestral(model, x, sigmas, extra_args=None, callback=None, eta=1.0, s_noise=1.0, noise=None):
    extra_args = extra_args or {}
    noise = noise or DeviceNoise(x, _seed(extra_args))
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * _ones(x), **extra_args)
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        _report(callback, i, denoised, x)
        if sigma_down == 0:
            x = x + _to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        else:
            t, t_next = _t_of(sigmas[i]), _t_of(sigma_down)
            h = t_next - t
            s = t + h / 2
            x_2 = (_sigma_of(s) / _sigma_of(t)) * x - (-h / 2).expm1() * denoised
            denoised_2 = model(x_2, _sigma_of(s) * _ones(x), **extra_args)
            x = (_sigma_of(t_next) / _sigma_of(t)) * x - (-h).expm1() * denoised_2
        if sigmas[i + 1] > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


def dpmpp_sde(model, x, sigmas, extra_args=None, callback=None, eta=1.0, s_noise=1.0, noise=None, r=0.5,
              noise_on_cpu=True):
    """DPM-Solver++ SDE: two evaluations per step (at ratio r in λ), Brownian-tree noise.

    Written in ComfyUI's current data-prediction form with α = σ·e^λ (exactly 1 in theory for eps models, but
    kept so the float32 rounding is the same)."""
    if len(sigmas) <= 1:
        return x
    extra_args = extra_args or {}
    noise = noise or brownian_noise_for(x, sigmas, _seed(extra_args), on_cpu=noise_on_cpu)
    inject = eta > 0 and s_noise > 0
    fac = 1 / (2 * r)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * _ones(x), **extra_args)
        _report(callback, i, denoised, x)
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        lambda_s, lambda_t = _t_of(sigmas[i]), _t_of(sigmas[i + 1])
        h = lambda_t - lambda_s
        lambda_s_1 = lambda_s + r * h
        sigma_s_1 = _sigma_of(lambda_s_1)
        alpha_s = sigmas[i] * lambda_s.exp()
        alpha_s_1 = sigma_s_1 * lambda_s_1.exp()
        alpha_t = sigmas[i + 1] * lambda_t.exp()

        sigma_down, sigma_up = ancestral_step(_sigma_of(lambda_s), _sigma_of(lambda_s_1), eta)
        h_ = _t_of(sigma_down) - lambda_s
        x_2 = (alpha_s_1 / alpha_s) * (-h_).exp() * x - alpha_s_1 * (-h_).expm1() * denoised
        if inject:
            x_2 = x_2 + alpha_s_1 * noise(sigmas[i], sigma_s_1) * s_noise * sigma_up
        denoised_2 = model(x_2, sigma_s_1 * _ones(x), **extra_args)

        sigma_down, sigma_up = ancestral_step(_sigma_of(lambda_s), _sigma_of(lambda_t), eta)
        h_ = _t_of(sigma_down) - lambda_s
        denoised_d = (1 - fac) * denoised + fac * denoised_2
        x = (alpha_t / alpha_s) * (-h_).exp() * x - alpha_t * (-h_).expm1() * denoised_d
        if inject:
            x = x + alpha_t * noise(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


def dpmpp_2m(model, x, sigmas, extra_args=None, callback=None):
    extra_args = extra_args or {}
    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * _ones(x), **extra_args)
        _report(callback, i, denoised, x)
        t, t_next = _t_of(sigmas[i]), _t_of(sigmas[i + 1])
        h = t_next - t
        if old_denoised is None or sigmas[i + 1] == 0:
            x = (_sigma_of(t_next) / _sigma_of(t)) * x - (-h).expm1() * denoised
        else:
            r = (t - _t_of(sigmas[i - 1])) / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (_sigma_of(t_next) / _sigma_of(t)) * x - (-h).expm1() * denoised_d
        old_denoised = denoised
    return x


def dpmpp_2m_sde(model, x, sigmas, extra_args=None, callback=None, eta=1.0, s_noise=1.0, noise=None,
                 solver_type="midpoint", noise_on_cpu=True):
    if len(sigmas) <= 1:
        return x
    if solver_type not in ("heun", "midpoint"):
        raise ValueError("solver_type must be 'heun' or 'midpoint'")
    extra_args = extra_args or {}
    noise = noise or brownian_noise_for(x, sigmas, _seed(extra_args), on_cpu=noise_on_cpu)
    old_denoised, h, h_last = None, None, None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * _ones(x), **extra_args)
        _report(callback, i, denoised, x)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            lambda_s, lambda_t = _t_of(sigmas[i]), _t_of(sigmas[i + 1])
            h = lambda_t - lambda_s
            h_eta = h * (eta + 1)
            alpha_t = sigmas[i + 1] * lambda_t.exp()
            x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x + alpha_t * (-h_eta).expm1().neg() * denoised
            if old_denoised is not None:
                r = h_last / h
                if solver_type == "heun":
                    x = x + alpha_t * ((-h_eta).expm1().neg() / (-h_eta) + 1) * (1 / r) * (denoised - old_denoised)
                else:
                    x = x + 0.5 * alpha_t * (-h_eta).expm1().neg() * (1 / r) * (denoised - old_denoised)
            if eta > 0 and s_noise > 0:
                x = x + noise(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-2 * h * eta).expm1().neg().sqrt() * s_noise
        old_denoised = denoised
        h_last = h
    return x


def dpmpp_3m_sde(model, x, sigmas, extra_args=None, callback=None, eta=1.0, s_noise=1.0, noise=None,
                 noise_on_cpu=True):
    if len(sigmas) <= 1:
        return x
    extra_args = extra_args or {}
    noise = noise or brownian_noise_for(x, sigmas, _seed(extra_args), on_cpu=noise_on_cpu)
    denoised_1 = denoised_2 = None
    h = h_1 = h_2 = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * _ones(x), **extra_args)
        _report(callback, i, denoised, x)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            lambda_s, lambda_t = _t_of(sigmas[i]), _t_of(sigmas[i + 1])
            h = lambda_t - lambda_s
            h_eta = h * (eta + 1)
            alpha_t = sigmas[i + 1] * lambda_t.exp()
            x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x + alpha_t * (-h_eta).expm1().neg() * denoised
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                phi_3 = phi_2 / h_eta - 0.5
                x = x + (alpha_t * phi_2) * d1 - (alpha_t * phi_3) * d2
            elif h_1 is not None:
                d = (denoised - denoised_1) / (h_1 / h)
                x = x + (alpha_t * (h_eta.neg().expm1() / h_eta + 1)) * d
            if eta > 0 and s_noise > 0:
                x = x + noise(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-2 * h * eta).expm1().neg().sqrt() * s_noise
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
    return x


# --- step samplers in VP space, multistep Adams, gradient estimation -----------------------------------------

def _ddpm_step(x_vp, sigma, sigma_next, eps, noise):
    alpha_cumprod = 1 / ((sigma * sigma) + 1)
    alpha_cumprod_next = 1 / ((sigma_next * sigma_next) + 1)
    alpha = alpha_cumprod / alpha_cumprod_next
    mu = (1.0 / alpha).sqrt() * (x_vp - (1 - alpha) * eps / (1 - alpha_cumprod).sqrt())
    if sigma_next > 0:
        mu = mu + ((1 - alpha) * (1.0 - alpha_cumprod_next) / (1.0 - alpha_cumprod)).sqrt() * noise(sigma, sigma_next)
    return mu


def ddpm(model, x, sigmas, extra_args=None, callback=None, noise=None):
    """DDPM ancestral posterior step, taken on x/√(1+σ²)."""
    extra_args = extra_args or {}
    noise = noise or DeviceNoise(x, _seed(extra_args))
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * _ones(x), **extra_args)
        _report(callback, i, denoised, x)
        x = _ddpm_step(x / torch.sqrt(1.0 + sigmas[i] ** 2.0), sigmas[i], sigmas[i + 1],
                       (x - denoised) / sigmas[i], noise)
        if sigmas[i + 1] != 0:
            x = x * torch.sqrt(1.0 + sigmas[i + 1] ** 2.0)
    return x


def lcm(model, x, sigmas, extra_args=None, callback=None, noise=None):
    extra_args = extra_args or {}
    noise = noise or DeviceNoise(x, _seed(extra_args))
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * _ones(x), **extra_args)
        _report(callback, i, denoised, x)
        x = denoised
        if sigmas[i + 1] > 0:
            x = noise(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] + x
    return x


def ipndm(model, x, sigmas, extra_args=None, callback=None, max_order=4):
    """Improved PNDM: Adams–Bashforth on d with fixed-step coefficients, order rising to 4."""
    extra_args = extra_args or {}
    history: list[torch.Tensor] = []
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * _ones(x), **extra_args)
        _report(callback, i, denoised, x)
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
    """iPNDM with variable-step coefficients (exact Adams–Bashforth weights for uneven sigma spacing)."""
    extra_args = extra_args or {}
    history: list[torch.Tensor] = []
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * _ones(x), **extra_args)
        _report(callback, i, denoised, x)
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


def gradient_estimation(model, x, sigmas, extra_args=None, callback=None, ge_gamma=2.0):
    extra_args = extra_args or {}
    old_d = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * _ones(x), **extra_args)
        _report(callback, i, denoised, x)
        d = _to_d(x, sigmas[i], denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if old_d is None:
            x = x + d * dt
        else:
            x = x + (ge_gamma * d + (1 - ge_gamma) * old_d) * dt
        old_d = d
    return x


# --- registry ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sampler:
    """What a SAMPLER link carries: the function plus ComfyUI's per-sampler rules."""

    name: str
    function: Callable[..., torch.Tensor]
    options: Mapping[str, Any] = field(default_factory=dict)
    # KSampler computes one more step and drops the penultimate sigma for these.
    drops_penultimate: bool = False
    # "ddim": inpainting re-noises the kept area with fresh CPU noise from seed + 1 instead of the initial noise.
    inpaint_random_noise: bool = False

    def __call__(self, model, x, sigmas, extra_args=None, callback=None):
        return self.function(model, x, sigmas, extra_args=extra_args, callback=callback, **self.options)


def _build_registry() -> Mapping[str, Sampler]:
    from . import solvers

    on_device = {"noise_on_cpu": False}
    entries = [
        Sampler("euler", euler),
        Sampler("euler_cfg_pp", euler_cfg_pp),
        Sampler("euler_ancestral", euler_ancestral),
        Sampler("euler_ancestral_cfg_pp", euler_ancestral_cfg_pp),
        Sampler("heun", heun),
        Sampler("heunpp2", heunpp2),
        Sampler("dpm_2", dpm_2, drops_penultimate=True),
        Sampler("dpm_2_ancestral", dpm_2_ancestral, drops_penultimate=True),
        Sampler("lms", lms),
        Sampler("dpmpp_2s_ancestral", dpmpp_2s_ancestral),
        Sampler("dpmpp_sde", dpmpp_sde),
        Sampler("dpmpp_sde_gpu", dpmpp_sde, on_device),
        Sampler("dpmpp_2m", dpmpp_2m),
        Sampler("dpmpp_2m_sde", dpmpp_2m_sde),
        Sampler("dpmpp_2m_sde_gpu", dpmpp_2m_sde, on_device),
        Sampler("dpmpp_2m_sde_heun", dpmpp_2m_sde, {"solver_type": "heun"}),
        Sampler("dpmpp_2m_sde_heun_gpu", dpmpp_2m_sde, {"solver_type": "heun", **on_device}),
        Sampler("dpmpp_3m_sde", dpmpp_3m_sde),
        Sampler("dpmpp_3m_sde_gpu", dpmpp_3m_sde, on_device),
        Sampler("ddpm", ddpm),
        Sampler("lcm", lcm),
        Sampler("ipndm", ipndm),
        Sampler("ipndm_v", ipndm_v),
        Sampler("deis", solvers.deis),
        Sampler("gradient_estimation", gradient_estimation),
        Sampler("ddim", euler, inpaint_random_noise=True),
        Sampler("uni_pc", solvers.uni_pc, {"variant": "bh1"}, drops_penultimate=True),
        Sampler("uni_pc_bh2", solvers.uni_pc, {"variant": "bh2"}, drops_penultimate=True),
    ]
    return MappingProxyType({entry.name: entry for entry in entries})


SAMPLERS: Mapping[str, Sampler] = _build_registry()

# ComfyUI's KSAMPLER_NAMES order (minus the samplers not implemented here), then ddim, uni_pc, uni_pc_bh2.
_COMFY_ORDER = (
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2", "dpm_2",
    "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp",
    "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu",
    "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "lcm", "ipndm",
    "ipndm_v", "deis", "res_multistep", "res_multistep_cfg_pp", "res_multistep_ancestral",
    "res_multistep_ancestral_cfg_pp", "gradient_estimation", "gradient_estimation_cfg_pp", "er_sde", "seeds_2",
    "seeds_3", "sa_solver", "sa_solver_pece", "ddim", "uni_pc", "uni_pc_bh2",
)
SAMPLER_NAMES: tuple[str, ...] = tuple(name for name in _COMFY_ORDER if name in SAMPLERS)


def sampler_for_name(name: str) -> Sampler:
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler '{name}' (known: {', '.join(SAMPLER_NAMES)})") from None


def is_max_denoise(sigma_max: float, first_sigma: float) -> bool:
    """ComfyUI scales the initial noise by √(1+σ²) only when sampling starts from the top of the schedule."""
    return math.isclose(sigma_max, first_sigma, rel_tol=1e-5) or first_sigma > sigma_max
