"""k-diffusion-style samplers, with ComfyUI's step rules and noise sources.

Every sampler is a pure function `(model, x, sigmas, extra_args, callback, **options) -> x`:

* `model(x, sigma_batch, **extra_args)` returns the denoised estimate D (the CFG'd x0 prediction) in the
  sampling space; `extra_args["seed"]` seeds the ancestral/SDE noise. Samplers that need the unguided
  prediction (CFG++) call `model(..., return_uncond=True)` and get `(D, D_uncond)`.
* `callback(i, denoised, x)` is called once per step.
* `sigmas` is a float32 1-D tensor on x's device, usually ending in 0.

Notation: d = (x − D)/σ is the ODE derivative in σ; λ = −log σ (half log-SNR for eps models).

Flow-matching models (the CONST prediction, read from the denoiser's `.schedule`) change a few samplers as
ComfyUI does: the ancestral ones take rectified-flow steps, and the SDE / exponential ones use λ = log((1 − σ)/σ)
with a first σ of 1 moved just below it.

This module holds the one- and two-stage samplers and the registry (SAMPLER_NAMES in ComfyUI's order);
multistep.py (LMS, iPNDM, RES, gradient estimation, ER-SDE), solvers.py (UniPC, DEIS), dpm_solver.py
(dpm_fast, dpm_adaptive) and sa_solver.py hold the rest.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch

from . import flow
from .noise import DeviceNoise, brownian_noise_for
from .sampler_steps import (  # noqa: F401
    Callback,
    ancestral_step,
    batch_ones,
    flow_ancestral_step,
    half_log_snr,
    is_flow,
    lambda_of,
    report,
    seed_of,
    sigma_at_half_log_snr,
    sigma_of,
    snr_safe_sigmas,
    to_d,
)

# --- first-order and Runge-Kutta samplers --------------------------------------------------------------------

def euler(model, x, sigmas, extra_args=None, callback=None):
    extra_args = extra_args or {}
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * batch_ones(x), **extra_args)
        report(callback, i, denoised, x)
        x = x + to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
    return x


def euler_ancestral(model, x, sigmas, extra_args=None, callback=None, eta=1.0, s_noise=1.0, noise=None):
    extra_args = extra_args or {}
    noise = noise or DeviceNoise(x, seed_of(extra_args))
    if is_flow(model):
        return flow.euler_ancestral_flow(model, x, sigmas, extra_args, callback, eta, s_noise, noise)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * batch_ones(x), **extra_args)
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        report(callback, i, denoised, x)
        if sigma_down == 0:
            x = denoised
        else:
            d = to_d(x, sigmas[i], denoised)
            x = x + d * (sigma_down - sigmas[i]) + noise(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x



def euler_ancestral_cfg_pp(model, x, sigmas, extra_args=None, callback=None, eta=1.0, s_noise=1.0, noise=None):
    """CFG++: step from the guided x0 along the *unguided* noise direction (α = σ·e^λ kept for rounding)."""
    extra_args = extra_args or {}
    noise = noise or DeviceNoise(x, seed_of(extra_args))
    flow = is_flow(model)
    for i in range(len(sigmas) - 1):
        denoised, uncond = model(x, sigmas[i] * batch_ones(x), return_uncond=True, **extra_args)
        report(callback, i, denoised, x)
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        alpha_s = sigmas[i] * half_log_snr(sigmas[i], flow).exp()
        alpha_t = sigmas[i + 1] * half_log_snr(sigmas[i + 1], flow).exp()
        d = to_d(x, sigmas[i], alpha_s * uncond)
        sigma_down, sigma_up = ancestral_step(sigmas[i] / alpha_s, sigmas[i + 1] / alpha_t, eta)
        x = alpha_t * denoised + (alpha_t * sigma_down) * d
        if eta > 0 and s_noise > 0:
            x = x + alpha_t * noise(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


def euler_cfg_pp(model, x, sigmas, extra_args=None, callback=None):
    return euler_ancestral_cfg_pp(model, x, sigmas, extra_args, callback, eta=0.0, s_noise=0.0)


def heun(model, x, sigmas, extra_args=None, callback=None):
    extra_args = extra_args or {}
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * batch_ones(x), **extra_args)
        report(callback, i, denoised, x)
        d = to_d(x, sigmas[i], denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = to_d(x_2, sigmas[i + 1], model(x_2, sigmas[i + 1] * batch_ones(x), **extra_args))
            x = x + (d + d_2) / 2 * dt
    return x


def heunpp2(model, x, sigmas, extra_args=None, callback=None):
    """Heun++: up to three evaluations per step, the derivatives weighted by their sigma relative to σ_0."""
    extra_args = extra_args or {}
    sigma_end = sigmas[-1]
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * batch_ones(x), **extra_args)
        report(callback, i, denoised, x)
        d = to_d(x, sigmas[i], denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == sigma_end:
            x = x + d * dt
            continue
        x_2 = x + d * dt
        d_2 = to_d(x_2, sigmas[i + 1], model(x_2, sigmas[i + 1] * batch_ones(x), **extra_args))
        if sigmas[i + 2] == sigma_end:
            w2 = sigmas[i + 1] / (2 * sigmas[0])
            x = x + (d * (1 - w2) + d_2 * w2) * dt
        else:
            x_3 = x_2 + d_2 * (sigmas[i + 2] - sigmas[i + 1])
            d_3 = to_d(x_3, sigmas[i + 2], model(x_3, sigmas[i + 2] * batch_ones(x), **extra_args))
            w = 3 * sigmas[0]
            w2, w3 = sigmas[i + 1] / w, sigmas[i + 2] / w
            x = x + ((1 - w2 - w3) * d + w2 * d_2 + w3 * d_3) * dt
    return x


def dpm_2(model, x, sigmas, extra_args=None, callback=None):
    """DPM-Solver-2: derivative re-evaluated at the log-midpoint sigma."""
    extra_args = extra_args or {}
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * batch_ones(x), **extra_args)
        report(callback, i, denoised, x)
        d = to_d(x, sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = x + d * (sigmas[i + 1] - sigmas[i])
        else:
            sigma_mid = sigmas[i].log().lerp(sigmas[i + 1].log(), 0.5).exp()
            x_2 = x + d * (sigma_mid - sigmas[i])
            d_2 = to_d(x_2, sigma_mid, model(x_2, sigma_mid * batch_ones(x), **extra_args))
            x = x + d_2 * (sigmas[i + 1] - sigmas[i])
    return x


def dpm_2_ancestral(model, x, sigmas, extra_args=None, callback=None, eta=1.0, s_noise=1.0, noise=None):
    extra_args = extra_args or {}
    noise = noise or DeviceNoise(x, seed_of(extra_args))
    flow = is_flow(model)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * batch_ones(x), **extra_args)
        if flow:
            sigma_down, rescale, sigma_up = flow_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        else:
            sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        report(callback, i, denoised, x)
        d = to_d(x, sigmas[i], denoised)
        if sigma_down == 0:
            x = x + d * (sigma_down - sigmas[i])
        else:
            sigma_mid = sigmas[i].log().lerp(sigma_down.log(), 0.5).exp()
            x_2 = x + d * (sigma_mid - sigmas[i])
            d_2 = to_d(x_2, sigma_mid, model(x_2, sigma_mid * batch_ones(x), **extra_args))
            x = x + d_2 * (sigma_down - sigmas[i])
            if flow:
                x = rescale * x
            x = x + noise(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


# --- DPM-Solver++ family (exponential integrators in λ = −log σ) ---------------------------------------------

def dpmpp_2s_ancestral(model, x, sigmas, extra_args=None, callback=None, eta=1.0, s_noise=1.0, noise=None):
    extra_args = extra_args or {}
    noise = noise or DeviceNoise(x, seed_of(extra_args))
    if is_flow(model):
        return flow.dpmpp_2s_ancestral_flow(model, x, sigmas, extra_args, callback, eta, s_noise, noise)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * batch_ones(x), **extra_args)
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        report(callback, i, denoised, x)
        if sigma_down == 0:
            x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        else:
            t, t_next = lambda_of(sigmas[i]), lambda_of(sigma_down)
            h = t_next - t
            s = t + h / 2
            x_2 = (sigma_of(s) / sigma_of(t)) * x - (-h / 2).expm1() * denoised
            denoised_2 = model(x_2, sigma_of(s) * batch_ones(x), **extra_args)
            x = (sigma_of(t_next) / sigma_of(t)) * x - (-h).expm1() * denoised_2
        if sigmas[i + 1] > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x



def dpmpp_2s_ancestral_cfg_pp(model, x, sigmas, extra_args=None, callback=None, eta=1.0, s_noise=1.0, noise=None):
    """DPM-Solver++(2S) ancestral with CFG++: x is shifted by (D − D_uncond) before each exponential step."""
    extra_args = extra_args or {}
    noise = noise or DeviceNoise(x, seed_of(extra_args))
    for i in range(len(sigmas) - 1):
        denoised, uncond = model(x, sigmas[i] * batch_ones(x), return_uncond=True, **extra_args)
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        report(callback, i, denoised, x)
        if sigma_down == 0:
            x = denoised + to_d(x, sigmas[i], uncond) * sigma_down
        else:
            t, t_next = lambda_of(sigmas[i]), lambda_of(sigma_down)
            h = t_next - t
            s = t + h / 2
            shifted = x + (denoised - uncond)
            x_2 = (sigma_of(s) / sigma_of(t)) * shifted - (-h / 2).expm1() * denoised
            denoised_2 = model(x_2, sigma_of(s) * batch_ones(x), **extra_args)
            x = (sigma_of(t_next) / sigma_of(t)) * shifted - (-h).expm1() * denoised_2
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
    noise = noise or brownian_noise_for(x, sigmas, seed_of(extra_args), on_cpu=noise_on_cpu)
    flow = is_flow(model)
    sigmas = snr_safe_sigmas(sigmas, model)
    inject = eta > 0 and s_noise > 0
    fac = 1 / (2 * r)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * batch_ones(x), **extra_args)
        report(callback, i, denoised, x)
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        lambda_s, lambda_t = half_log_snr(sigmas[i], flow), half_log_snr(sigmas[i + 1], flow)
        h = lambda_t - lambda_s
        lambda_s_1 = lambda_s + r * h
        sigma_s_1 = sigma_at_half_log_snr(lambda_s_1, flow)
        alpha_s = sigmas[i] * lambda_s.exp()
        alpha_s_1 = sigma_s_1 * lambda_s_1.exp()
        alpha_t = sigmas[i + 1] * lambda_t.exp()

        sigma_down, sigma_up = ancestral_step(sigma_of(lambda_s), sigma_of(lambda_s_1), eta)
        h_ = lambda_of(sigma_down) - lambda_s
        x_2 = (alpha_s_1 / alpha_s) * (-h_).exp() * x - alpha_s_1 * (-h_).expm1() * denoised
        if inject:
            x_2 = x_2 + alpha_s_1 * noise(sigmas[i], sigma_s_1) * s_noise * sigma_up
        denoised_2 = model(x_2, sigma_s_1 * batch_ones(x), **extra_args)

        sigma_down, sigma_up = ancestral_step(sigma_of(lambda_s), sigma_of(lambda_t), eta)
        h_ = lambda_of(sigma_down) - lambda_s
        denoised_d = (1 - fac) * denoised + fac * denoised_2
        x = (alpha_t / alpha_s) * (-h_).exp() * x - alpha_t * (-h_).expm1() * denoised_d
        if inject:
            x = x + alpha_t * noise(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


def dpmpp_2m(model, x, sigmas, extra_args=None, callback=None):
    extra_args = extra_args or {}
    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * batch_ones(x), **extra_args)
        report(callback, i, denoised, x)
        t, t_next = lambda_of(sigmas[i]), lambda_of(sigmas[i + 1])
        h = t_next - t
        if old_denoised is None or sigmas[i + 1] == 0:
            x = (sigma_of(t_next) / sigma_of(t)) * x - (-h).expm1() * denoised
        else:
            r = (t - lambda_of(sigmas[i - 1])) / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigma_of(t_next) / sigma_of(t)) * x - (-h).expm1() * denoised_d
        old_denoised = denoised
    return x


def dpmpp_2m_cfg_pp(model, x, sigmas, extra_args=None, callback=None):
    """DPM-Solver++(2M) with CFG++: the exponential step is taken with the unguided prediction."""
    extra_args = extra_args or {}
    old_uncond = None
    for i in range(len(sigmas) - 1):
        denoised, uncond = model(x, sigmas[i] * batch_ones(x), return_uncond=True, **extra_args)
        report(callback, i, denoised, x)
        t, t_next = lambda_of(sigmas[i]), lambda_of(sigmas[i + 1])
        h = t_next - t
        if old_uncond is None or sigmas[i + 1] == 0:
            mix = -torch.exp(-h) * uncond
        else:
            r = (t - lambda_of(sigmas[i - 1])) / h
            mix = -torch.exp(-h) * uncond - torch.expm1(-h) * (1 / (2 * r)) * (denoised - old_uncond)
        x = denoised + mix + torch.exp(-h) * x
        old_uncond = uncond
    return x


def dpmpp_2m_sde(model, x, sigmas, extra_args=None, callback=None, eta=1.0, s_noise=1.0, noise=None,
                 solver_type="midpoint", noise_on_cpu=True):
    if len(sigmas) <= 1:
        return x
    if solver_type not in ("heun", "midpoint"):
        raise ValueError("solver_type must be 'heun' or 'midpoint'")
    extra_args = extra_args or {}
    noise = noise or brownian_noise_for(x, sigmas, seed_of(extra_args), on_cpu=noise_on_cpu)
    flow = is_flow(model)
    sigmas = snr_safe_sigmas(sigmas, model)
    old_denoised: torch.Tensor | None = None
    h: torch.Tensor | None = None
    h_last: torch.Tensor | None = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * batch_ones(x), **extra_args)
        report(callback, i, denoised, x)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            lambda_s, lambda_t = half_log_snr(sigmas[i], flow), half_log_snr(sigmas[i + 1], flow)
            h = lambda_t - lambda_s
            h_eta = h * (eta + 1)
            alpha_t = sigmas[i + 1] * lambda_t.exp()
            x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x + alpha_t * (-h_eta).expm1().neg() * denoised
            if old_denoised is not None and h_last is not None:
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
    noise = noise or brownian_noise_for(x, sigmas, seed_of(extra_args), on_cpu=noise_on_cpu)
    flow = is_flow(model)
    sigmas = snr_safe_sigmas(sigmas, model)
    denoised_1: torch.Tensor | None = None
    denoised_2: torch.Tensor | None = None
    h: torch.Tensor | None = None
    h_1: torch.Tensor | None = None
    h_2: torch.Tensor | None = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * batch_ones(x), **extra_args)
        report(callback, i, denoised, x)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            lambda_s, lambda_t = half_log_snr(sigmas[i], flow), half_log_snr(sigmas[i + 1], flow)
            h = lambda_t - lambda_s
            h_eta = h * (eta + 1)
            alpha_t = sigmas[i + 1] * lambda_t.exp()
            x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x + alpha_t * (-h_eta).expm1().neg() * denoised
            # (h_k and denoised_k are set together, from the previous steps)
            if h_2 is not None and h_1 is not None and denoised_1 is not None and denoised_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                phi_3 = phi_2 / h_eta - 0.5
                x = x + (alpha_t * phi_2) * d1 - (alpha_t * phi_3) * d2
            elif h_1 is not None and denoised_1 is not None:
                d = (denoised - denoised_1) / (h_1 / h)
                x = x + (alpha_t * (h_eta.neg().expm1() / h_eta + 1)) * d
            if eta > 0 and s_noise > 0:
                x = x + noise(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-2 * h * eta).expm1().neg().sqrt() * s_noise
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
    return x


# --- SEEDS (stochastic explicit exponential derivative-free solvers, arXiv 2305.14267) -----------------------

def _h_phi_1(h: torch.Tensor) -> torch.Tensor:
    return torch.expm1(h)


def _h_phi_2(h: torch.Tensor) -> torch.Tensor:
    return (torch.expm1(h) - h) / h


def seeds_2(model, x, sigmas, extra_args=None, callback=None, eta=1.0, s_noise=1.0, noise=None, r=0.5,
            solver_type="phi_1"):
    if solver_type not in ("phi_1", "phi_2"):
        raise ValueError("solver_type must be 'phi_1' or 'phi_2'")
    extra_args = extra_args or {}
    noise = noise or DeviceNoise(x, seed_of(extra_args))
    flow = is_flow(model)
    sigmas = snr_safe_sigmas(sigmas, model)
    inject = eta > 0 and s_noise > 0
    fac = 1 / (2 * r)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * batch_ones(x), **extra_args)
        report(callback, i, denoised, x)
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        lambda_s, lambda_t = half_log_snr(sigmas[i], flow), half_log_snr(sigmas[i + 1], flow)
        h = lambda_t - lambda_s
        h_eta = h * (eta + 1)
        lambda_s_1 = torch.lerp(lambda_s, lambda_t, r)
        sigma_s_1 = sigma_at_half_log_snr(lambda_s_1, flow)
        alpha_s_1 = sigma_s_1 * lambda_s_1.exp()
        alpha_t = sigmas[i + 1] * lambda_t.exp()

        x_2 = sigma_s_1 / sigmas[i] * (-r * h * eta).exp() * x - alpha_s_1 * _h_phi_1(-r * h_eta) * denoised
        if inject:
            sde_noise = (-2 * r * h * eta).expm1().neg().sqrt() * noise(sigmas[i], sigma_s_1)
            x_2 = x_2 + sde_noise * sigma_s_1 * s_noise
        denoised_2 = model(x_2, sigma_s_1 * batch_ones(x), **extra_args)

        if solver_type == "phi_1":
            denoised_d = torch.lerp(denoised, denoised_2, fac)
            x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x - alpha_t * _h_phi_1(-h_eta) * denoised_d
        else:
            b2 = _h_phi_2(-h_eta) / r
            b1 = _h_phi_1(-h_eta) - b2
            x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x - alpha_t * (b1 * denoised + b2 * denoised_2)
        if inject:
            segment = (r - 1) * h * eta
            fresh = noise(sigma_s_1, sigmas[i + 1])
            sde_noise = sde_noise * segment.exp() + segment.mul(2).expm1().neg().sqrt() * fresh
            x = x + sde_noise * sigmas[i + 1] * s_noise
    return x


def seeds_3(model, x, sigmas, extra_args=None, callback=None, eta=1.0, s_noise=1.0, noise=None, r_1=1.0 / 3,
            r_2=2.0 / 3):
    extra_args = extra_args or {}
    noise = noise or DeviceNoise(x, seed_of(extra_args))
    flow = is_flow(model)
    sigmas = snr_safe_sigmas(sigmas, model)
    inject = eta > 0 and s_noise > 0
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * batch_ones(x), **extra_args)
        report(callback, i, denoised, x)
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        lambda_s, lambda_t = half_log_snr(sigmas[i], flow), half_log_snr(sigmas[i + 1], flow)
        h = lambda_t - lambda_s
        h_eta = h * (eta + 1)
        lambda_s_1, lambda_s_2 = torch.lerp(lambda_s, lambda_t, r_1), torch.lerp(lambda_s, lambda_t, r_2)
        sigma_s_1 = sigma_at_half_log_snr(lambda_s_1, flow)
        sigma_s_2 = sigma_at_half_log_snr(lambda_s_2, flow)
        alpha_s_1 = sigma_s_1 * lambda_s_1.exp()
        alpha_s_2 = sigma_s_2 * lambda_s_2.exp()
        alpha_t = sigmas[i + 1] * lambda_t.exp()

        x_2 = sigma_s_1 / sigmas[i] * (-r_1 * h * eta).exp() * x - alpha_s_1 * _h_phi_1(-r_1 * h_eta) * denoised
        if inject:
            sde_noise = (-2 * r_1 * h * eta).expm1().neg().sqrt() * noise(sigmas[i], sigma_s_1)
            x_2 = x_2 + sde_noise * sigma_s_1 * s_noise
        denoised_2 = model(x_2, sigma_s_1 * batch_ones(x), **extra_args)

        a3_2 = r_2 / r_1 * _h_phi_2(-r_2 * h_eta)
        a3_1 = _h_phi_1(-r_2 * h_eta) - a3_2
        x_3 = sigma_s_2 / sigmas[i] * (-r_2 * h * eta).exp() * x - alpha_s_2 * (a3_1 * denoised + a3_2 * denoised_2)
        if inject:
            segment = (r_1 - r_2) * h * eta
            sde_noise = sde_noise * segment.exp() + segment.mul(2).expm1().neg().sqrt() * noise(sigma_s_1, sigma_s_2)
            x_3 = x_3 + sde_noise * sigma_s_2 * s_noise
        denoised_3 = model(x_3, sigma_s_2 * batch_ones(x), **extra_args)

        b3 = _h_phi_2(-h_eta) / r_2
        b1 = _h_phi_1(-h_eta) - b3
        x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x - alpha_t * (b1 * denoised + b3 * denoised_3)
        if inject:
            segment = (r_2 - 1) * h * eta
            fresh = noise(sigma_s_2, sigmas[i + 1])
            sde_noise = sde_noise * segment.exp() + segment.mul(2).expm1().neg().sqrt() * fresh
            x = x + sde_noise * sigmas[i + 1] * s_noise
    return x


# --- step samplers in VP space -------------------------------------------------------------------------------

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
    noise = noise or DeviceNoise(x, seed_of(extra_args))
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * batch_ones(x), **extra_args)
        report(callback, i, denoised, x)
        x = _ddpm_step(x / torch.sqrt(1.0 + sigmas[i] ** 2.0), sigmas[i], sigmas[i + 1],
                       (x - denoised) / sigmas[i], noise)
        if sigmas[i + 1] != 0:
            x = x * torch.sqrt(1.0 + sigmas[i + 1] ** 2.0)
    return x


def lcm(model, x, sigmas, extra_args=None, callback=None, noise=None):
    extra_args = extra_args or {}
    noise = noise or DeviceNoise(x, seed_of(extra_args))
    schedule = getattr(model, "schedule", None)  # the model's own noise_scaling (flow: an interpolation)
    renoise = schedule.noise_scaling if schedule is not None else lambda sigma, fresh, latent: fresh * sigma + latent
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * batch_ones(x), **extra_args)
        report(callback, i, denoised, x)
        x = denoised
        if sigmas[i + 1] > 0:
            x = renoise(sigmas[i + 1], noise(sigmas[i], sigmas[i + 1]), x)
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

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))  # shared: keep it read-only

    def __call__(self, model, x, sigmas, extra_args=None, callback=None):
        return self.function(model, x, sigmas, extra_args=extra_args, callback=callback, **self.options)


def _build_registry() -> Mapping[str, Sampler]:
    from . import dpm_solver, multistep, sa_solver, solvers

    on_device = {"noise_on_cpu": False}
    # In the order of ComfyUI's KSampler sampler_name list (KSAMPLER_NAMES, then ddim, uni_pc, uni_pc_bh2).
    entries = [
        Sampler("euler", euler),
        Sampler("euler_cfg_pp", euler_cfg_pp),
        Sampler("euler_ancestral", euler_ancestral),
        Sampler("euler_ancestral_cfg_pp", euler_ancestral_cfg_pp),
        Sampler("heun", heun),
        Sampler("heunpp2", heunpp2),
        Sampler("dpm_2", dpm_2, drops_penultimate=True),
        Sampler("dpm_2_ancestral", dpm_2_ancestral, drops_penultimate=True),
        Sampler("lms", multistep.lms),
        Sampler("dpm_fast", dpm_solver.dpm_fast),
        Sampler("dpm_adaptive", dpm_solver.dpm_adaptive),
        Sampler("dpmpp_2s_ancestral", dpmpp_2s_ancestral),
        Sampler("dpmpp_2s_ancestral_cfg_pp", dpmpp_2s_ancestral_cfg_pp),
        Sampler("dpmpp_sde", dpmpp_sde),
        Sampler("dpmpp_sde_gpu", dpmpp_sde, on_device),
        Sampler("dpmpp_2m", dpmpp_2m),
        Sampler("dpmpp_2m_cfg_pp", dpmpp_2m_cfg_pp),
        Sampler("dpmpp_2m_sde", dpmpp_2m_sde),
        Sampler("dpmpp_2m_sde_gpu", dpmpp_2m_sde, on_device),
        Sampler("dpmpp_2m_sde_heun", dpmpp_2m_sde, {"solver_type": "heun"}),
        Sampler("dpmpp_2m_sde_heun_gpu", dpmpp_2m_sde, {"solver_type": "heun", **on_device}),
        Sampler("dpmpp_3m_sde", dpmpp_3m_sde),
        Sampler("dpmpp_3m_sde_gpu", dpmpp_3m_sde, on_device),
        Sampler("ddpm", ddpm),
        Sampler("lcm", lcm),
        Sampler("ipndm", multistep.ipndm),
        Sampler("ipndm_v", multistep.ipndm_v),
        Sampler("deis", solvers.deis),
        Sampler("res_multistep", multistep.res_multistep, {"eta": 0.0}),
        Sampler("res_multistep_cfg_pp", multistep.res_multistep, {"eta": 0.0, "cfg_pp": True}),
        Sampler("res_multistep_ancestral", multistep.res_multistep),
        Sampler("res_multistep_ancestral_cfg_pp", multistep.res_multistep, {"cfg_pp": True}),
        Sampler("gradient_estimation", multistep.gradient_estimation),
        Sampler("gradient_estimation_cfg_pp", multistep.gradient_estimation, {"cfg_pp": True}),
        Sampler("er_sde", multistep.er_sde),
        Sampler("seeds_2", seeds_2),
        Sampler("seeds_3", seeds_3),
        Sampler("sa_solver", sa_solver.sa_solver),
        Sampler("sa_solver_pece", sa_solver.sa_solver, {"use_pece": True}),
        Sampler("ddim", euler, inpaint_random_noise=True),
        Sampler("uni_pc", solvers.uni_pc, {"variant": "bh1"}, drops_penultimate=True),
        Sampler("uni_pc_bh2", solvers.uni_pc, {"variant": "bh2"}, drops_penultimate=True),
    ]
    return MappingProxyType({entry.name: entry for entry in entries})


SAMPLERS: Mapping[str, Sampler] = _build_registry()

# The registry's entries are written in the order of ComfyUI's KSampler sampler_name list (what the editor shows).
SAMPLER_NAMES: tuple[str, ...] = tuple(SAMPLERS)


def sampler_for_name(name: str) -> Sampler:
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler '{name}' (known: {', '.join(SAMPLER_NAMES)})") from None


def is_max_denoise(sigma_max: float, first_sigma: float) -> bool:
    """ComfyUI scales the initial noise by √(1+σ²) only when sampling starts from the top of the schedule."""
    return math.isclose(sigma_max, first_sigma, rel_tol=1e-5) or first_sigma > sigma_max
