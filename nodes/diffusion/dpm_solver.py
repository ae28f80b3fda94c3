"""DPM-Solver (arXiv 2206.00927) in noise-prediction form: dpm_fast (fixed NFE budget, orders 3…, 2, 1) and
dpm_adaptive (embedded 2/3-order pair with a PID step-size controller).

ComfyUI runs both between the first sigma and the last *non-zero* sigma, uniformly in λ = −log σ, whatever the
scheduler chose in between; the result keeps the noise of that last sigma.
"""

from __future__ import annotations

import math

import torch

from .noise import DeviceNoise
from .sampler_steps import ancestral_step, batch_ones, lambda_of, seed_of, sigma_of


class _Solver:
    def __init__(self, model, extra_args: dict, callback):
        self.model = model
        self.extra_args = extra_args
        self.callback = callback

    def eps(self, cache: dict, key: str, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if key not in cache:
            sigma = sigma_of(t)
            cache[key] = (x - self.model(x, sigma * batch_ones(x), **self.extra_args)) / sigma
        return cache[key]

    def step_1(self, x, t, t_next, cache):
        h = t_next - t
        return x - sigma_of(t_next) * h.expm1() * self.eps(cache, "eps", x, t)

    def step_2(self, x, t, t_next, cache, r1=0.5):
        h = t_next - t
        eps = self.eps(cache, "eps", x, t)
        s1 = t + r1 * h
        u1 = x - sigma_of(s1) * (r1 * h).expm1() * eps
        eps_r1 = self.eps(cache, "eps_r1", u1, s1)
        return (x - sigma_of(t_next) * h.expm1() * eps
                - sigma_of(t_next) / (2 * r1) * h.expm1() * (eps_r1 - eps))

    def step_3(self, x, t, t_next, cache, r1=1 / 3, r2=2 / 3):
        h = t_next - t
        eps = self.eps(cache, "eps", x, t)
        s1, s2 = t + r1 * h, t + r2 * h
        u1 = x - sigma_of(s1) * (r1 * h).expm1() * eps
        eps_r1 = self.eps(cache, "eps_r1", u1, s1)
        u2 = (x - sigma_of(s2) * (r2 * h).expm1() * eps
              - sigma_of(s2) * (r2 / r1) * ((r2 * h).expm1() / (r2 * h) - 1) * (eps_r1 - eps))
        eps_r2 = self.eps(cache, "eps_r2", u2, s2)
        return (x - sigma_of(t_next) * h.expm1() * eps
                - sigma_of(t_next) / r2 * (h.expm1() / h - 1) * (eps_r2 - eps))

    def report(self, i, x, t, cache):
        if self.callback is not None:
            self.callback(i, x - sigma_of(t) * cache["eps"], x)


def _range(sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    if len(sigmas) <= 1:
        return None
    sigma_min = sigmas[-1] if sigmas[-1] != 0 else sigmas[-2]
    if sigma_min <= 0 or sigmas[0] <= 0:
        raise ValueError("dpm_fast / dpm_adaptive need non-zero sigmas")
    return sigmas[0].log().neg(), sigma_min.log().neg()


def dpm_fast(model, x, sigmas, extra_args=None, callback=None):
    """len(sigmas) − 1 model evaluations spread over third-order steps (then a second- and first-order one)."""
    ends = _range(sigmas)
    if ends is None:
        return x
    t_start, t_end = ends
    nfe = len(sigmas) - 1
    solver = _Solver(model, extra_args or {}, callback)
    m = math.floor(nfe / 3) + 1
    ts = torch.linspace(float(t_start), float(t_end), m + 1, device=x.device)
    orders = [3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3]
    for i, order in enumerate(orders):
        cache: dict = {}
        t, t_next = ts[i], ts[i + 1]
        solver.eps(cache, "eps", x, t)
        solver.report(i, x, t, cache)
        step = {1: solver.step_1, 2: solver.step_2, 3: solver.step_3}[order]
        x = step(x, t, t_next, cache)
    return x


class StepSizeController:
    """k-diffusion's PID step-size controller: h is scaled by ε_n^−b1 · ε_n−1^−b2 · ε_n−2^−b3 (ε the scaled error
    of the last three accepted steps), softened by 1 + atan(f − 1); a step is accepted when that factor is at
    least `accept_safety`."""

    def __init__(self, h: float, pcoeff: float, icoeff: float, dcoeff: float, order: float, accept_safety: float,
                 eps: float = 1e-8):
        self.h = h
        self.b1 = (pcoeff + icoeff + dcoeff) / order
        self.b2 = -(pcoeff + 2 * dcoeff) / order
        self.b3 = dcoeff / order
        self.accept_safety = accept_safety
        self.eps = eps
        self.inverse_errors: list[float] = []

    def propose_step(self, error: torch.Tensor) -> bool:
        inverse = 1 / (float(error) + self.eps)
        if not self.inverse_errors:
            self.inverse_errors = [inverse, inverse, inverse]
        self.inverse_errors[0] = inverse
        history = self.inverse_errors
        factor = history[0] ** self.b1 * history[1] ** self.b2 * history[2] ** self.b3
        factor = 1 + math.atan(factor - 1)
        accept = factor >= self.accept_safety
        if accept:
            self.inverse_errors = [history[0], history[0], history[1]]
        self.h *= factor
        return accept


def dpm_adaptive(model, x, sigmas, extra_args=None, callback=None, order=3, rtol=0.05, atol=0.0078, h_init=0.05,
                 pcoeff=0.0, icoeff=1.0, dcoeff=0.0, accept_safety=0.81, eta=0.0, s_noise=1.0, noise=None,
                 max_attempts=10000):
    """Adaptive DPM-Solver-12 (order 2) or -23 (order 3): each step of the higher order, its error from the
    embedded lower-order one; ignores the step count (only the ends of the schedule matter). eta > 0 adds
    ancestral noise after each accepted step (then the controller works with order 1.5)."""
    if order not in (2, 3):
        raise ValueError("order should be 2 or 3")
    ends = _range(sigmas)
    if ends is None:
        return x
    t_start, t_end = ends
    forward = bool(t_end > t_start)
    if not forward and eta:
        raise ValueError("eta must be 0 for reverse sampling")
    extra_args = extra_args or {}
    noise = noise or DeviceNoise(x, seed_of(extra_args))
    solver = _Solver(model, extra_args, None)
    atol_t, rtol_t = torch.tensor(atol), torch.tensor(rtol)
    controller = StepSizeController(abs(h_init) * (1 if forward else -1), pcoeff, icoeff, dcoeff,
                                    1.5 if eta else order, accept_safety)
    s, x_prev = t_start, x
    for attempt in range(max_attempts):
        if not (s < t_end - 1e-5 if forward else s > t_end + 1e-5):
            break
        cache: dict = {}
        t = torch.minimum(t_end, s + controller.h) if forward else torch.maximum(t_end, s + controller.h)
        sigma_up: torch.Tensor | float
        if eta:
            sigma_down, _ = ancestral_step(sigma_of(s), sigma_of(t), eta)
            t_down = torch.minimum(t_end, lambda_of(sigma_down))
            sigma_up = (sigma_of(t) ** 2 - sigma_of(t_down) ** 2) ** 0.5
        else:
            t_down, sigma_up = t, 0.0
        denoised = x - sigma_of(s) * solver.eps(cache, "eps", x, s)
        if order == 2:
            x_low = solver.step_1(x, s, t_down, cache)
            x_high = solver.step_2(x, s, t_down, cache)
        else:
            x_low = solver.step_2(x, s, t_down, cache, r1=1 / 3)  # shares the r = 1/3 evaluation with 3rd order
            x_high = solver.step_3(x, s, t_down, cache)
        delta = torch.maximum(atol_t, rtol_t * torch.maximum(x_low.abs(), x_prev.abs()))
        error = torch.linalg.norm((x_low - x_high) / delta) / x.numel() ** 0.5
        if controller.propose_step(error):
            x_prev = x_low
            x = x_high + sigma_up * s_noise * noise(sigma_of(s), sigma_of(t))
            s = t
        if callback is not None:
            callback(attempt, denoised, x)
    return x
