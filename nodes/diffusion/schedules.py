"""The noise schedules of ComfyUI's model_sampling objects and ComfyUI's sigma schedulers.

Discrete schedules follow ComfyUI's `ModelSamplingDiscrete` exactly: the sigma table is computed in float64 and
stored as float32, sigma(t) interpolates linearly in log-sigma, and the UNet only ever sees the nearest integer
timestep. Continuous schedules (`ModelSamplingContinuousEDM` / `ContinuousV` / `CosmosRFlow`) map σ to a real
timestep by a formula and keep a log-uniform table of 1000 sigmas between σ_min and σ_max for the schedulers
that read a table. The flow-matching schedules (`ModelSamplingDiscreteFlow` for SD3 / AuraFlow,
`ModelSamplingFlux`) keep σ in (0, 1] on a grid of shifted timesteps; `StableCascadeSampling` is a cosine
schedule on t in [0, 1]. Every schedule carries its prediction type (nodes.diffusion.predictions) and offers ComfyUI's
model_sampling methods (calculate_input, calculate_denoised, noise_scaling, ...), so hooks that receive it as
`args["model"].model_sampling` work unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np
import torch

from .models import SamplingConfig
from .predictions import EpsPrediction, prediction_for

# UI order, as ComfyUI lists them.
SCHEDULER_NAMES: tuple[str, ...] = (
    "simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal", "linear_quadratic",
    "kl_optimal",
)

# ComfyUI's zero-terminal-SNR rescale pins the last ᾱ here (exactly 0 would make σ infinite).
ZSNR_LAST_ALPHA_BAR = 4.8973451890853435e-08


def rescale_zero_terminal_snr(sigmas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023 ("Common Diffusion Noise Schedules and Sample Steps are Flawed"), on a sigma table:
    √ᾱ shifted so the last step has zero signal and scaled so the first keeps its value."""
    root_alpha_bar = (1 / (sigmas * sigmas + 1)).sqrt()
    first, last = root_alpha_bar[0].clone(), root_alpha_bar[-1].clone()
    root_alpha_bar = (root_alpha_bar - last) * (first / (first - last))
    alpha_bar = root_alpha_bar ** 2
    alpha_bar[-1] = ZSNR_LAST_ALPHA_BAR
    return ((1 - alpha_bar) / alpha_bar) ** 0.5


class ModelSampling:
    """A schedule plus its prediction type: ComfyUI's model_sampling interface. Subclasses set `sigmas` /
    `log_sigmas` (ascending float32 tables) and define timestep(σ), sigma(t) and percent_to_sigma."""

    sigmas: torch.Tensor
    log_sigmas: torch.Tensor

    def __init__(self, prediction: EpsPrediction):
        self.prediction = prediction

    @property
    def sigma_data(self) -> float:
        return self.prediction.sigma_data

    @property
    def sigma_min(self) -> torch.Tensor:
        return self.sigmas[0]

    @property
    def sigma_max(self) -> torch.Tensor:
        return self.sigmas[-1]

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def percent_to_sigma(self, percent: float) -> float:
        raise NotImplementedError

    # ComfyUI's model_sampling methods, delegated to the prediction type.
    def calculate_input(self, sigma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self.prediction.calculate_input(sigma, noise)

    def calculate_denoised(self, sigma: torch.Tensor, model_output: torch.Tensor,
                           model_input: torch.Tensor) -> torch.Tensor:
        timestep = self.timestep(sigma) if self.prediction.needs_timestep else None
        return self.prediction.calculate_denoised(sigma, model_output, model_input, timestep)

    def noise_scaling(self, sigma: torch.Tensor, noise: torch.Tensor, latent_image: torch.Tensor,
                      max_denoise: bool = False) -> torch.Tensor:
        return self.prediction.noise_scaling(sigma, noise, latent_image, max_denoise)

    def inverse_noise_scaling(self, sigma: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        return self.prediction.inverse_noise_scaling(sigma, latent)


class DiscreteSchedule(ModelSampling):
    """Sigma table of a model trained on `timesteps` discrete noise levels (scaled-linear betas, optionally
    rescaled to zero terminal SNR)."""

    def __init__(self, config: SamplingConfig | None = None):
        config = config or SamplingConfig()
        if config.schedule not in ("discrete", "discrete_distilled"):
            raise ValueError(f"a {config.schedule!r} sampling config is not a discrete schedule (use schedule_for)")
        super().__init__(prediction_for(config.prediction, config.sigma_data))
        self.config = config
        betas = torch.linspace(config.beta_start ** 0.5, config.beta_end ** 0.5, config.timesteps,
                               dtype=torch.float64) ** 2
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        sigmas64 = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
        if config.zsnr:
            sigmas64 = rescale_zero_terminal_snr(sigmas64)
        self._set_table(sigmas64)

    def _set_table(self, sigmas: torch.Tensor) -> None:
        self.sigmas = sigmas.float()
        self.log_sigmas = sigmas.log().float()

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


class DistilledDiscreteSchedule(DiscreteSchedule):
    """LCM's schedule: only every (timesteps / 50)-th level of the discrete table, the last of each stride, so
    the table holds 50 sigmas and table index i is network timestep i·stride + stride − 1."""

    original_timesteps = 50

    def __init__(self, config: SamplingConfig | None = None):
        super().__init__(config)
        count = len(self.sigmas)
        self.skip_steps = count // self.original_timesteps
        kept = [count - 1 - i * self.skip_steps for i in range(self.original_timesteps)][::-1]
        self._set_table(self.sigmas[kept])  # (log taken of the float32 values, as ComfyUI does)

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        index = super().timestep(sigma)
        return index * self.skip_steps + (self.skip_steps - 1)

    def sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        return super().sigma((timestep.float() - (self.skip_steps - 1)) / self.skip_steps)


class ContinuousEDMSchedule(ModelSampling):
    """Continuous σ in [σ_min, σ_max]; the network timestep is ¼·log σ (Karras et al. 2022's c_noise)."""

    table_size = 1000

    def __init__(self, config: SamplingConfig):
        super().__init__(prediction_for(config.prediction, config.sigma_data))
        self.config = config
        if not 0 < config.sigma_min < config.sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={config.sigma_min}, "
                             f"sigma_max={config.sigma_max}")
        # A log-uniform table for the schedulers that read one (simple, ddim_uniform, beta).
        self.sigmas = torch.linspace(math.log(config.sigma_min), math.log(config.sigma_max), self.table_size).exp()
        self.log_sigmas = self.sigmas.log()

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        return 0.25 * sigma.log()

    def sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        return (timestep / 0.25).exp()

    def percent_to_sigma(self, percent: float) -> float:
        if percent <= 0.0:
            return 999999999.9
        if percent >= 1.0:
            return 0.0
        log_min = math.log(float(self.sigma_min))
        return math.exp((math.log(float(self.sigma_max)) - log_min) * (1.0 - percent) + log_min)


class ContinuousVSchedule(ContinuousEDMSchedule):
    """Continuous σ with the network timestep 2/π·atan σ (in [0, 1))."""

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma.atan() / math.pi * 2

    def sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        return (timestep * math.pi / 2).tan()


class CosmosRFlowSchedule(ContinuousEDMSchedule):
    """Cosmos' rectified flow: network timestep σ/(σ + 1); timesteps at or past σ_max's map to σ_max."""

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma / (sigma + 1)

    def sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        sigma_max = self.sigma_max.to(timestep.device)
        top = sigma_max / (sigma_max + 1)
        return torch.where(timestep >= top, sigma_max, timestep / (1 - timestep))


def time_snr_shift(shift: float, t: torch.Tensor | float) -> torch.Tensor | float:
    """SD3's timestep shift (Esser et al. 2024): t ↦ shift·t / (1 + (shift − 1)·t); the identity for shift 1."""
    if shift == 1.0:
        return t
    return shift * t / (1 + (shift - 1) * t)


def flux_time_shift(mu: float, t: torch.Tensor | float) -> torch.Tensor | float:
    """Flux's resolution-dependent shift: t ↦ e^μ / (e^μ + 1/t − 1) (SD3's shift with shift = e^μ)."""
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1))


def flux_mu(max_shift: float, base_shift: float, width: int, height: int) -> float:
    """μ for an image of width × height pixels: linear in its 2×2-patch token count (width·height / 256), from
    base_shift at 256 tokens to max_shift at 4096 (ModelSamplingFlux)."""
    slope = (max_shift - base_shift) / (4096 - 256)
    return (width * height / (8 * 8 * 2 * 2)) * slope + (base_shift - slope * 256)


class FlowSchedule(ModelSampling):
    """Flow matching on a grid of `timesteps` levels (ComfyUI's ModelSamplingDiscreteFlow): σ(t) is the shifted
    t/multiplier, the network sees σ·multiplier (1000 for SD3, 1 for AuraFlow), and σ runs up to exactly 1."""

    grid = 1000

    def __init__(self, config: SamplingConfig):
        super().__init__(prediction_for(config.prediction, config.sigma_data))
        self.config = config
        self.shift = config.shift
        self.multiplier = config.multiplier
        table = self.sigma((torch.arange(1, self.grid + 1, 1) / self.grid) * self.multiplier)
        self.sigmas = table
        self.log_sigmas = table.log()  # (only for the interface: no flow scheduler reads it)

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma * self.multiplier

    def sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(time_snr_shift(self.shift, timestep / self.multiplier))

    def percent_to_sigma(self, percent: float) -> float:
        if percent <= 0.0:
            return 1.0
        if percent >= 1.0:
            return 0.0
        return float(time_snr_shift(self.shift, 1.0 - percent))


class FluxSchedule(FlowSchedule):
    """Flux's flow schedule (ModelSamplingFlux): 10000 grid levels, σ(t) = flux_time_shift(μ, t) with μ the
    config's shift, and the network timestep is σ itself (the model scales it)."""

    grid = 10000

    def __init__(self, config: SamplingConfig):
        super().__init__(dataclasses.replace(config, multiplier=1.0))

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma

    def sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(flux_time_shift(self.shift, timestep))

    def percent_to_sigma(self, percent: float) -> float:
        if percent <= 0.0:
            return 1.0
        if percent >= 1.0:
            return 0.0
        return float(flux_time_shift(self.shift, 1.0 - percent))


class StableCascadeSchedule(ModelSampling):
    """Stable Cascade's continuous cosine schedule on t in [0, 1] (ComfyUI's StableCascadeSampling):
    ᾱ(t) = cos²((t + s)/(1 + s)·π/2) / cos²(s/(1 + s)·π/2) with s = 0.008, its log-SNR lowered by 2·log(shift),
    ᾱ clamped to [1e-4, 0.9999]; a table of 10000 sigmas at t = 1/10000 … 1 for the schedulers."""

    grid = 10000
    cosine_s = 8e-3

    def __init__(self, config: SamplingConfig):
        super().__init__(prediction_for(config.prediction, config.sigma_data))
        self.config = config
        self.shift = config.shift
        self._s = torch.tensor(self.cosine_s)
        self._alpha_bar_0 = torch.cos(self._s / (1 + self._s) * torch.pi * 0.5) ** 2
        t = torch.tensor([(i + 1) / self.grid for i in range(self.grid)], dtype=torch.float64).float()
        self.sigmas = self.sigma(t).float()
        self.log_sigmas = self.sigmas.log()

    def sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        timestep = torch.as_tensor(timestep)
        s = self._s.to(timestep.device)
        alpha_bar = torch.cos((timestep + s) / (1 + s) * torch.pi * 0.5) ** 2 / self._alpha_bar_0.to(timestep.device)
        if self.shift != 1.0:
            log_snr = (alpha_bar / (1 - alpha_bar)).log() + 2 * torch.log(1.0 / torch.tensor(self.shift))
            alpha_bar = log_snr.sigmoid()
        alpha_bar = alpha_bar.clamp(0.0001, 0.9999)
        return ((1 - alpha_bar) / alpha_bar) ** 0.5

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        alpha_bar = (1 / (sigma * sigma + 1)).clamp(0, 1.0)
        s, alpha_bar_0 = self._s.to(sigma.device), self._alpha_bar_0.to(sigma.device)
        return ((alpha_bar * alpha_bar_0) ** 0.5).acos() / (torch.pi * 0.5) * (1 + s) - s

    def percent_to_sigma(self, percent: float) -> float:
        if percent <= 0.0:
            return 999999999.9
        if percent >= 1.0:
            return 0.0
        return float(self.sigma(torch.tensor(1.0 - percent)))


_SCHEDULE_KINDS: dict[str, Callable[[SamplingConfig], ModelSampling]] = {
    "discrete": DiscreteSchedule,
    "discrete_distilled": DistilledDiscreteSchedule,
    "continuous_edm": ContinuousEDMSchedule,
    "continuous_v": ContinuousVSchedule,
    "cosmos_rflow": CosmosRFlowSchedule,
    "discrete_flow": FlowSchedule,
    "flux": FluxSchedule,
    "stable_cascade": StableCascadeSchedule,
}
SCHEDULE_KINDS: tuple[str, ...] = tuple(_SCHEDULE_KINDS)


def schedule_for(config: SamplingConfig | None = None) -> ModelSampling:
    """The schedule object (ComfyUI's model_sampling) a MODEL's sampling config describes."""
    config = config or SamplingConfig()
    try:
        kind = _SCHEDULE_KINDS[config.schedule]
    except KeyError:
        raise ValueError(f"unknown schedule kind {config.schedule!r} (known: {', '.join(SCHEDULE_KINDS)})") from None
    return kind(config)


def _append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros([1])])


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    ramp = torch.linspace(0, 1, steps)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return _append_zero((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho)


def exponential_sigmas(steps: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    return _append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), steps).exp())


def _normal(schedule: ModelSampling, steps: int, sgm: bool = False) -> torch.Tensor:
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


def _simple(schedule: ModelSampling, steps: int) -> torch.Tensor:
    stride = len(schedule.sigmas) / steps
    sigmas = [float(schedule.sigmas[-(1 + int(i * stride))]) for i in range(steps)]
    return torch.tensor(sigmas + [0.0], dtype=torch.float32)


def _ddim_uniform(schedule: ModelSampling, steps: int) -> torch.Tensor:
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


def _beta(schedule: ModelSampling, steps: int, alpha: float = 0.6, beta: float = 0.6) -> torch.Tensor:
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


def _linear_quadratic(schedule: ModelSampling, steps: int, threshold: float = 0.025) -> torch.Tensor:
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


def _with_range(fn: Callable[[int, float, float], torch.Tensor]) -> Callable[[ModelSampling, int], torch.Tensor]:
    return lambda schedule, steps: fn(steps, float(schedule.sigma_min), float(schedule.sigma_max))


_SCHEDULERS: dict[str, Callable[[ModelSampling, int], torch.Tensor]] = {
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


def calculate_sigmas(schedule: ModelSampling, scheduler: str, steps: int) -> torch.Tensor:
    """The float32 sigma list (steps + 1 values, ending in 0, for most schedulers)."""
    try:
        handler = _SCHEDULERS[scheduler]
    except KeyError:
        raise ValueError(f"unknown scheduler '{scheduler}' (known: {', '.join(SCHEDULER_NAMES)})") from None
    return handler(schedule, steps)


def sampler_sigmas(schedule: ModelSampling, scheduler: str, steps: int, drops_penultimate: bool) -> torch.Tensor:
    """KSampler's schedule: samplers that skip their penultimate sigma get one more step, then lose it."""
    if not drops_penultimate:
        return calculate_sigmas(schedule, scheduler, steps)
    sigmas = calculate_sigmas(schedule, scheduler, steps + 1)
    return torch.cat([sigmas[:-2], sigmas[-1:]])


def denoise_sigmas(schedule: ModelSampling, scheduler: str, steps: int, denoise: float,
                   drops_penultimate: bool = False) -> torch.Tensor:
    """KSampler.set_steps: with denoise < 1 compute int(steps/denoise) steps and keep the last steps + 1 sigmas,
    so exactly `steps` model steps always run. denoise <= 0 gives an empty schedule (nothing to do)."""
    if denoise > 0.9999:
        return sampler_sigmas(schedule, scheduler, steps, drops_penultimate)
    if denoise <= 0.0:
        return torch.zeros(0, dtype=torch.float32)
    full = sampler_sigmas(schedule, scheduler, int(steps / denoise), drops_penultimate)
    return full[-(steps + 1):]


def basic_scheduler_sigmas(schedule: ModelSampling, scheduler: str, steps: int, denoise: float) -> torch.Tensor:
    """BasicScheduler node: like denoise_sigmas, but it never knows the sampler (no penultimate drop)."""
    total_steps = steps
    if denoise < 1.0:
        if denoise <= 0.0:
            return torch.zeros(0, dtype=torch.float32)
        total_steps = int(steps / denoise)
    return calculate_sigmas(schedule, scheduler, total_steps)[-(steps + 1):]


def sd_turbo_sigmas(schedule: ModelSampling, steps: int, denoise: float) -> torch.Tensor:
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


# --- the custom-sampling scheduler nodes' schedules (k-diffusion's formulas, float32 as ComfyUI computes them) -----

def polyexponential_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 1.0) -> torch.Tensor:
    """log σ runs from log σ_max to log σ_min along (1 − ramp)^ρ; ρ = 1 is the exponential schedule."""
    ramp = torch.linspace(1, 0, steps) ** rho
    return _append_zero(torch.exp(ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min)))


def vp_sigmas(steps: int, beta_d: float = 19.9, beta_min: float = 0.1, eps_s: float = 1e-3) -> torch.Tensor:
    """The continuous variance-preserving schedule σ(t) = √(exp(β_d t²/2 + β_min t) − 1), t from 1 to eps_s."""
    t = torch.linspace(1, eps_s, steps)
    return _append_zero(torch.sqrt(torch.special.expm1(beta_d * t ** 2 / 2 + beta_min * t)))


def laplace_sigmas(steps: int, sigma_min: float, sigma_max: float, mu: float = 0.0, beta: float = 0.5) -> torch.Tensor:
    """Log σ distributed like a Laplace(μ, β) quantile function (arXiv 2407.03297), clamped to [σ_min, σ_max].
    Ends on σ_min, not on an appended zero."""
    ramp = torch.linspace(0, 1, steps)
    centred = 0.5 - ramp
    log_sigma = mu - beta * torch.sign(centred) * torch.log(1 - 2 * torch.abs(centred) + 1e-5)
    return torch.clamp(torch.exp(log_sigma), min=sigma_min, max=sigma_max)


def beta_sigmas(schedule: ModelSampling, steps: int, alpha: float = 0.6, beta: float = 0.6) -> torch.Tensor:
    """The "beta" scheduler with its distribution's shape parameters chosen (BetaSamplingScheduler)."""
    return _beta(schedule, steps, alpha, beta)


# --- operations on SIGMAS ----------------------------------------------------------------------------------------

def split_sigmas(sigmas: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low): the schedule up to and from `step`; both hold sigmas[step]."""
    return sigmas[:step + 1], sigmas[step:]


def split_sigmas_denoise(sigmas: torch.Tensor, denoise: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) with the low part the last round(steps · denoise) steps. As in ComfyUI, a low part of no steps
    leaves the high part empty (not the whole schedule)."""
    steps = max(sigmas.shape[-1] - 1, 0)
    low_steps = round(steps * denoise)
    high = sigmas[:sigmas.shape[-1] - low_steps] if low_steps > 0 else sigmas[:0]
    return high, sigmas[-(low_steps + 1):]


def flip_sigmas(sigmas: torch.Tensor) -> torch.Tensor:
    """Reversed (for inversion); a leading 0 becomes 0.0001 so the first step has a noise level."""
    if len(sigmas) == 0:
        return sigmas
    flipped = sigmas.flip(0)
    if flipped[0] == 0:
        flipped[0] = 0.0001
    return flipped


def set_first_sigma(sigmas: torch.Tensor, sigma: float) -> torch.Tensor:
    changed = sigmas.clone()
    changed[0] = sigma
    return changed


_SPACINGS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "linear": lambda ramp: ramp,
    "cosine": lambda ramp: torch.sin(ramp * math.pi / 2),
    "sine": lambda ramp: 1 - torch.cos(ramp * math.pi / 2),
}
SIGMA_SPACINGS: tuple[str, ...] = tuple(_SPACINGS)


def extend_intermediate_sigmas(sigmas: torch.Tensor, steps: int, start_at_sigma: float, end_at_sigma: float,
                               spacing: str) -> torch.Tensor:
    """Split every step that starts at a sigma within [end_at_sigma, start_at_sigma] (start < 0: no upper
    bound) into `steps` steps, spaced linearly or along a quarter cosine/sine wave."""
    if start_at_sigma < 0:
        start_at_sigma = float("inf")
    fractions = _SPACINGS[spacing](torch.linspace(0, 1, steps + 1, device=sigmas.device)[1:-1])
    extended: list[float] = []
    for i in range(len(sigmas) - 1):
        current, following = sigmas[i], sigmas[i + 1]
        extended.append(float(current))
        if end_at_sigma <= current <= start_at_sigma:
            extended.extend((fractions * (following - current) + current).tolist())
    if len(sigmas) > 0:
        extended.append(float(sigmas[-1]))
    return torch.tensor(extended, dtype=torch.float32)


def sampling_percent_to_sigma(schedule: ModelSampling, percent: float, actual: bool = False) -> float:
    """The sigma at a fraction of sampling. At 0 and 1 the interval-check values (a huge sigma, 0) unless
    `actual`, which gives the schedule's real σ_max / σ_min there."""
    if actual and percent == 0.0:
        return float(schedule.sigma_max)
    if actual and percent == 1.0:
        return float(schedule.sigma_min)
    return schedule.percent_to_sigma(percent)
