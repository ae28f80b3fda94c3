"""DPM-Solver (arXiv 2206.00927) in noise-prediction form: dpm_fast (fixed NFE budget, orders 3…, 2, 1) and
dpm_adaptive (embedded 2/3-order pair with a PID step-size controller).

ComfyUI runs both between the first sigma and the last *non-zero* sigma, uniformly in λ = −log σ, whatever the
scheduler chose in between; the result keeps the noise of that last sigma.
"""

from __future__ import annotations

import math

import torch

from .sampler_steps import batch_ones, sigma_of


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


def dpm_adaptive(model, x, sigmas, extra_args=None, callback=None, rtol=0.05, atol=0.0078, h_init=0.05,
                 accept_safety=0.81, max_attempts=10000):
    """Adaptive DPM-Solver-23: third-order steps, error from the embedded second-order one; ignores the step
    count (only the ends of the schedule matter)."""
    ends = _range(sigmas)
    if ends is None:
        return x
    t_start, t_end = ends
    solver = _Solver(model, extra_args or {}, None)
    atol_t, rtol_t = torch.tensor(atol), torch.tensor(rtol)
    order = 3
    h, s, x_prev = h_init, t_start, x
    for attempt in range(max_attempts):
        if not s < t_end - 1e-5:
            break
        cache: dict = {}
        t = torch.minimum(t_end, s + h)
        denoised = x - sigma_of(s) * solver.eps(cache, "eps", x, s)
        x_low = solver.step_2(x, s, t, cache, r1=1 / 3)  # shares the r = 1/3 evaluation with the 3rd-order step
        x_high = solver.step_3(x, s, t, cache)
        delta = torch.maximum(atol_t, rtol_t * torch.maximum(x_low.abs(), x_prev.abs()))
        error = torch.linalg.norm((x_low - x_high) / delta) / x.numel() ** 0.5
        # ComfyUI's PID controller with only its integral term: factor = (1/error)^(1/order), softened by atan.
        factor = 1 + math.atan((1 / (float(error) + 1e-8)) ** (1 / order) - 1)
        h *= factor
        if factor >= accept_safety:
            x_prev, x, s = x_low, x_high, t
        if callback is not None:
            callback(attempt, denoised, x)
    return x
