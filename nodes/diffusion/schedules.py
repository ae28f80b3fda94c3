"""The discrete noise schedule of SD-family models and ComfyUI's sigma schedulers.

Numbers follow ComfyUI's `ModelSamplingDiscrete` and `calculate_sigmas` exactly: the sigma table is computed in
float64 and stored as float32, sigma(t) interpolates linearly in log-sigma, and the UNet only ever sees the
nearest integer timestep.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from .models import SamplingConfig

# UI order, as ComfyUI lists them.
SCHEDULER_NAMES: tuple[str, ...] = (
    "simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal", "linear_quadratic",
    "kl_optimal",
)


class DiscreteSchedule:
    """Sigma table of a model trained on `timesteps` discrete noise levels (scaled-linear betas)."""

    def __init__(self, config: SamplingConfig | None = None):
        config = config or SamplingConfig()
        self.config = config
        betas = torch.linspace(config.beta_start ** 0.5, config.beta_end ** 0.5, config.timesteps,
                               dtype=torch.float64) ** 2
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        sigmas64 = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
        self.sigmas = sigmas64.float()
        self.log_sigmas = sigmas64.log().float()

    @property
    def sigma_min(self) -> torch.Tensor:
        return self.sigmas[0]

    @property
    def sigma_max(self) -> torch.Tensor:
        return self.sigmas[-1]

    def sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        """Sigma at a (possibly fractional) timestep: linear interpolation of log-sigma between neighbours."""
        t = torch.clamp(timestep.float(), min=0, max=len(self.sigmas) - 1)
        low, high = t.floor().long(), t.ceil().long()
        weight = t.frac()
        log_sigmas = self.log_sigmas.to(t.device)
        log_sigma = (1 - weight) * log_sigmas[low] + weight * log_sigmas[high]
        return log_sigma.exp()

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """The integer timestep whose log-sigma is nearest (returned as float, shaped like `sigma`)."""
        log_sigmas = self.log_sigmas.to(sigma.device)
        distances = sigma.log().reshape(1, -1) - log_sigmas[:, None]
        return distances.abs().argmin(dim=0).view(sigma.shape).float()

    def percent_to_sigma(self, percent: float) -> float:
        """Sigma at a fraction of the way through sampling (0 = start, pure noise; 1 = end)."""
        if percent <= 0.0:
            return 999999999.9
        if percent >= 1.0:
            return 0.0
        return self.sigma(torch.tensor((1.0 - percent) * 999.0)).item()


def _append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros([1])])


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    ramp = torch.linspace(0, 1, steps)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return _append_zero((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho)


def exponential_sigmas(steps: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    return _append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), steps).exp())


def _normal(schedule: DiscreteSchedule, steps: int, sgm: bool = False) -> torch.Tensor:
    start = schedule.timestep(schedule.sigma_max)
    end = schedule.timestep(schedule.sigma_min)
    append_zero = True
    if sgm:
        timesteps = torch.linspace(start.item(), end.item(), steps + 1)[:-1]
    else:
        # Models whose smallest sigma is ~0 end on it instead of an appended zero.
        if math.isclose(float(schedule.sigma(end)), 0, abs_tol=1e-5):
            steps += 1
            append_zero = False
        timesteps = torch.linspace(start.item(), end.item(), steps)
    sigmas = [float(schedule.sigma(t)) for t in timesteps]
    if append_zero:
        sigmas.append(0.0)
    return torch.tensor(sigmas, dtype=torch.float32)


def _simple(schedule: DiscreteSchedule, steps: int) -> torch.Tensor:
    stride = len(schedule.sigmas) / steps
    sigmas = [float(schedule.sigmas[-(1 + int(i * stride))]) for i in range(steps)]
    return torch.tensor(sigmas + [0.0], dtype=torch.float32)


def _ddim_uniform(schedule: DiscreteSchedule, steps: int) -> torch.Tensor:
    index = 1
    if math.isclose(float(schedule.sigmas[index]), 0, abs_tol=1e-5):
        steps += 1
        sigmas: list[float] = []
    else:
        sigmas = [0.0]
    stride = max(len(schedule.sigmas) // steps, 1)
    while index < len(schedule.sigmas):
        sigmas.append(float(schedule.sigmas[index]))
        index += stride
    return torch.tensor(sigmas[::-1], dtype=torch.float32)


def _beta(schedule: DiscreteSchedule, steps: int, alpha: float = 0.6, beta: float = 0.6) -> torch.Tensor:
    from scipy import stats

    last_timestep = len(schedule.sigmas) - 1
    quantiles = 1 - np.linspace(0, 1, steps, endpoint=False)
    timesteps = np.rint(stats.beta.ppf(quantiles, alpha, beta) * last_timestep)
    sigmas: list[float] = []
    previous = -1.0
    for t in timesteps:
        if t != previous:  # rounding may repeat a timestep: keep one
            sigmas.append(float(schedule.sigmas[int(t)]))
        previous = t
    return torch.tensor(sigmas + [0.0], dtype=torch.float32)


def _linear_quadratic(schedule: DiscreteSchedule, steps: int, threshold: float = 0.025) -> torch.Tensor:
    if steps == 1:
        fractions = [1.0, 0.0]
    else:
        linear_steps = steps // 2
        linear = [i * threshold / linear_steps for i in range(linear_steps)]
        step_diff = linear_steps - threshold * steps
        quadratic_steps = steps - linear_steps
        quadratic_coef = step_diff / (linear_steps * quadratic_steps ** 2)
        linear_coef = threshold / linear_steps - 2 * step_diff / (quadratic_steps ** 2)
        const = quadratic_coef * (linear_steps ** 2)
        quadratic = [quadratic_coef * (i ** 2) + linear_coef * i + const for i in range(linear_steps, steps)]
        fractions = [1.0 - x for x in linear + quadratic + [1.0]]
    return torch.tensor(fractions, dtype=torch.float32) * schedule.sigma_max


def _kl_optimal(steps: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    weights = torch.arange(steps, dtype=torch.float32).div_(max(steps - 1, 1))
    sigmas = weights.new_zeros(steps + 1)
    sigmas[:-1] = (weights * math.atan(sigma_min) + (1 - weights) * math.atan(sigma_max)).tan_()
    return sigmas


def _with_range(fn: Callable[[int, float, float], torch.Tensor]) -> Callable[[DiscreteSchedule, int], torch.Tensor]:
    return lambda schedule, steps: fn(steps, float(schedule.sigma_min), float(schedule.sigma_max))


_SCHEDULERS: dict[str, Callable[[DiscreteSchedule, int], torch.Tensor]] = {
    "simple": _simple,
    "sgm_uniform": lambda schedule, steps: _normal(schedule, steps, sgm=True),
    "karras": _with_range(karras_sigmas),
    "exponential": _with_range(exponential_sigmas),
    "ddim_uniform": _ddim_uniform,
    "beta": _beta,
    "normal": _normal,
    "linear_quadratic": _linear_quadratic,
    "kl_optimal": _with_range(_kl_optimal),
}


def calculate_sigmas(schedule: DiscreteSchedule, scheduler: str, steps: int) -> torch.Tensor:
    """The float32 sigma list (steps + 1 values, ending in 0, for most schedulers)."""
    try:
        handler = _SCHEDULERS[scheduler]
    except KeyError:
        raise ValueError(f"unknown scheduler '{scheduler}' (known: {', '.join(SCHEDULER_NAMES)})") from None
    return handler(schedule, steps)


def sampler_sigmas(schedule: DiscreteSchedule, scheduler: str, steps: int, drops_penultimate: bool) -> torch.Tensor:
    """KSampler's schedule: samplers that skip their penultimate sigma get one more step, then lose it."""
    if not drops_penultimate:
        return calculate_sigmas(schedule, scheduler, steps)
    sigmas = calculate_sigmas(schedule, scheduler, steps + 1)
    return torch.cat([sigmas[:-2], sigmas[-1:]])


def denoise_sigmas(schedule: DiscreteSchedule, scheduler: str, steps: int, denoise: float,
                   drops_penultimate: bool = False) -> torch.Tensor:
    """KSampler.set_steps: with denoise < 1 compute int(steps/denoise) steps and keep the last steps + 1 sigmas,
    so exactly `steps` model steps always run. denoise <= 0 gives an empty schedule (nothing to do)."""
    if denoise > 0.9999:
        return sampler_sigmas(schedule, scheduler, steps, drops_penultimate)
    if denoise <= 0.0:
        return torch.zeros(0, dtype=torch.float32)
    full = sampler_sigmas(schedule, scheduler, int(steps / denoise), drops_penultimate)
    return full[-(steps + 1):]


def basic_scheduler_sigmas(schedule: DiscreteSchedule, scheduler: str, steps: int, denoise: float) -> torch.Tensor:
    """BasicScheduler node: like denoise_sigmas, but it never knows the sampler (no penultimate drop)."""
    total_steps = steps
    if denoise < 1.0:
        if denoise <= 0.0:
            return torch.zeros(0, dtype=torch.float32)
        total_steps = int(steps / denoise)
    return calculate_sigmas(schedule, scheduler, total_steps)[-(steps + 1):]


def sd_turbo_sigmas(schedule: DiscreteSchedule, steps: int, denoise: float) -> torch.Tensor:
    """SDTurboScheduler: timesteps 999, 899, ..., 99, starting later for denoise < 1."""
    start = 10 - int(10 * denoise)
    timesteps = torch.flip(torch.arange(1, 11) * 100 - 1, (0,))[start:start + steps]
    return _append_zero(schedule.sigma(timesteps))


def advanced_sigmas(sigmas: torch.Tensor, start_at_step: int, end_at_step: int,
                    force_full_denoise: bool) -> torch.Tensor | None:
    """KSamplerAdvanced's truncation of a full schedule. None: start is past the end, return the input latent."""
    if end_at_step < len(sigmas) - 1:
        sigmas = sigmas[:end_at_step + 1].clone()
        if force_full_denoise:
            sigmas[-1] = 0
    if start_at_step < len(sigmas) - 1:
        return sigmas[start_at_step:]
    return None
