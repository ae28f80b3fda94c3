"""The custom-sampling building blocks beyond nodes.sampling: samplers with their options, schedulers, operations on
SIGMAS and AddNoise (ComfyUI's names, signatures and numerics).

A SAMPLER link carries a nodes.diffusion.samplers.Sampler: one of our sampler functions plus the options these
nodes set, passed as keywords on every call (k-diffusion's convention). The maths lives in nodes.diffusion.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Annotated, Any

import torch

from latentloom.engine.inputs import InputError
from latentloom.engine.node import Node, RunContext
from latentloom.engine.types import (
    FLOAT,
    LATENT,
    MODEL,
    NOISE,
    SAMPLER,
    SIGMAS,
    Boolean,
    Combo,
    Float,
    Int,
    Output,
    Socket,
)

from .diffusion import advanced_samplers, multistep, sa_solver, schedules, sigma_tables
from .diffusion.models import DiffusionModel
from .diffusion.samplers import Sampler, sampler_for_name
from .diffusion.schedules import schedule_for
from .sampling import CUSTOM, DenoiseInput, SigmaInput, StepsInput, _check_channels, _check_choice

SAMPLERS = f"{CUSTOM}/samplers"
SCHEDULERS = f"{CUSTOM}/schedulers"
SIGMA_OPS = f"{CUSTOM}/sigmas"

NOISE_DEVICES = ("gpu", "cpu")
LCM_UPSCALE_METHODS = ("bislerp", "nearest-exact", "bilinear", "area", "bicubic")
Strength = Annotated[float, Float(min=0.0, max=100.0, step=0.01, round=False)]


def _configured(name: str, **options: Any) -> Sampler:
    """A registry sampler (KSampler's list) with some of its function's options set."""
    base = sampler_for_name(name)
    return dataclasses.replace(base, options={**base.options, **options})


def _with_noise_device(name: str, noise_device: str) -> str:
    """The SDE samplers' Brownian tree lives on the CPU, or on the sampling device for the `_gpu` variants."""
    return name if _check_choice(noise_device, NOISE_DEVICES, "noise_device") == "cpu" else f"{name}_gpu"


def _positive(value: float, name: str) -> float:
    if not value > 0:
        raise InputError(name, f"is {value}; it must be above 0")
    return value


# --- samplers --------------------------------------------------------------------------------------------------

class SamplerEulerAncestral(Node):
    category = SAMPLERS
    outputs = (Output(SAMPLER),)

    eta: Strength = 1.0
    s_noise: Strength = 1.0

    def run(self, ctx: RunContext):
        return (_configured("euler_ancestral", eta=self.eta, s_noise=self.s_noise),)


class SamplerEulerAncestralCFGPP(Node):
    display_name = "SamplerEulerAncestralCFG++"
    category = SAMPLERS
    outputs = (Output(SAMPLER),)

    eta: Annotated[float, Float(min=0.0, max=1.0, step=0.01, round=False)] = 1.0
    s_noise: Annotated[float, Float(min=0.0, max=10.0, step=0.01, round=False)] = 1.0

    def run(self, ctx: RunContext):
        return (_configured("euler_ancestral_cfg_pp", eta=self.eta, s_noise=self.s_noise),)


EULER_CFG_PP_VERSIONS = ("regular", "alternative")


# The input is called `version`, like Node.version (the cache-key ClassVar, which stays intact): pydantic warns.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message='Field name "version"', category=UserWarning)

    class SamplerEulerCFGpp(Node):
        display_name = "SamplerEulerCFG++"
        category = "_for_testing"
        experimental = True
        outputs = (Output(SAMPLER),)

        version: Annotated[str, Combo(EULER_CFG_PP_VERSIONS)] = "regular"  # type: ignore[misc]

        def run(self, ctx: RunContext):
            if _check_choice(self.version, EULER_CFG_PP_VERSIONS, "version") == "alternative":
                return (Sampler("euler_cfg_pp_alternative", advanced_samplers.euler_cfg_pp_alternative),)
            return (sampler_for_name("euler_cfg_pp"),)


class SamplerLMS(Node):
    category = SAMPLERS
    outputs = (Output(SAMPLER),)

    order: Annotated[int, Int(min=1, max=100)] = 4

    def run(self, ctx: RunContext):
        return (_configured("lms", order=self.order),)


class SamplerDPMPP_3M_SDE(Node):  # noqa: N801 - ComfyUI's class name
    category = SAMPLERS
    outputs = (Output(SAMPLER),)

    eta: Strength = 1.0
    s_noise: Strength = 1.0
    noise_device: Annotated[str, Combo(NOISE_DEVICES)] = "gpu"

    def run(self, ctx: RunContext):
        name = _with_noise_device("dpmpp_3m_sde", self.noise_device)
        return (_configured(name, eta=self.eta, s_noise=self.s_noise),)


SDE_SOLVER_TYPES = ("midpoint", "heun")


class SamplerDPMPP_2M_SDE(Node):  # noqa: N801
    category = SAMPLERS
    outputs = (Output(SAMPLER),)

    solver_type: Annotated[str, Combo(SDE_SOLVER_TYPES)] = "midpoint"
    eta: Strength = 1.0
    s_noise: Strength = 1.0
    noise_device: Annotated[str, Combo(NOISE_DEVICES)] = "gpu"

    def run(self, ctx: RunContext):
        name = _with_noise_device("dpmpp_2m_sde", self.noise_device)
        solver_type = _check_choice(self.solver_type, SDE_SOLVER_TYPES, "solver_type")
        return (_configured(name, eta=self.eta, s_noise=self.s_noise, solver_type=solver_type),)


class SamplerDPMPP_SDE(Node):  # noqa: N801
    category = SAMPLERS
    outputs = (Output(SAMPLER),)

    eta: Strength = 1.0
    s_noise: Strength = 1.0
    r: Strength = 0.5
    noise_device: Annotated[str, Combo(NOISE_DEVICES)] = "gpu"

    def run(self, ctx: RunContext):
        name = _with_noise_device("dpmpp_sde", self.noise_device)
        # r is where the second evaluation sits in the step; the update divides by it.
        return (_configured(name, eta=self.eta, s_noise=self.s_noise, r=_positive(self.r, "r")),)


class SamplerDPMPP_2S_Ancestral(Node):  # noqa: N801
    category = SAMPLERS
    outputs = (Output(SAMPLER),)

    eta: Strength = 1.0
    s_noise: Strength = 1.0

    def run(self, ctx: RunContext):
        return (_configured("dpmpp_2s_ancestral", eta=self.eta, s_noise=self.s_noise),)


# The step-size factor is 1 + atan(f − 1) < 1 + π/2: a higher acceptance threshold rejects every step.
_MAX_STEP_FACTOR = 1 + math.pi / 2


class SamplerDPMAdaptative(Node):
    category = SAMPLERS
    outputs = (Output(SAMPLER),)

    order: Annotated[int, Int(min=2, max=3)] = 3
    rtol: Strength = 0.05
    atol: Strength = 0.0078
    h_init: Strength = 0.05
    pcoeff: Strength = 0.0
    icoeff: Strength = 1.0
    dcoeff: Strength = 0.0
    accept_safety: Strength = 0.81
    eta: Strength = 0.0
    s_noise: Strength = 1.0

    def run(self, ctx: RunContext):
        if self.rtol == 0 and self.atol == 0:
            raise InputError("atol", "and rtol are both 0: the error estimate divides by their tolerance")
        if self.accept_safety >= _MAX_STEP_FACTOR:
            raise InputError("accept_safety", f"is {self.accept_safety}; the step-size factor never reaches "
                             f"{_MAX_STEP_FACTOR:.3f}, so no step would ever be accepted")
        return (_configured("dpm_adaptive", order=self.order, rtol=self.rtol, atol=self.atol,
                            h_init=_positive(self.h_init, "h_init"), pcoeff=self.pcoeff, icoeff=self.icoeff,
                            dcoeff=self.dcoeff, accept_safety=self.accept_safety, eta=self.eta,
                            s_noise=self.s_noise),)


ER_SDE_SOLVER_TYPES = ("ER-SDE", "Reverse-time SDE", "ODE")


class SamplerER_SDE(Node):  # noqa: N801
    category = SAMPLERS
    outputs = (Output(SAMPLER),)

    solver_type: Annotated[str, Combo(ER_SDE_SOLVER_TYPES)] = "ER-SDE"
    max_stage: Annotated[int, Int(min=1, max=3)] = 3
    eta: Annotated[float, Float(min=0.0, max=100.0, step=0.01, round=False,
                                tooltip="Stochastic strength of reverse-time SDE.\nWhen eta=0, it reduces to "
                                        "deterministic ODE. This setting doesn't apply to ER-SDE solver type.")] = 1.0
    s_noise: Strength = 1.0

    def run(self, ctx: RunContext):
        solver_type = _check_choice(self.solver_type, ER_SDE_SOLVER_TYPES, "solver_type")
        eta, s_noise = self.eta, self.s_noise
        if solver_type == "ODE" or (solver_type == "Reverse-time SDE" and eta == 0):
            eta, s_noise = 0.0, 0.0
        scaler = None  # ER-SDE: the solver's own noise scaler
        if solver_type != "ER-SDE":
            scaler = functools.partial(multistep.reverse_time_sde_noise_scaler, eta=eta)
        return (_configured("er_sde", s_noise=s_noise, noise_scaler=scaler, max_stage=self.max_stage),)


class SamplerSASolver(Node):
    category = SAMPLERS
    outputs = (Output(SAMPLER),)

    model: Annotated[Any, Socket(MODEL)]
    eta: Annotated[float, Float(min=0.0, max=10.0, step=0.01, round=False)] = 1.0
    sde_start_percent: Annotated[float, Float(min=0.0, max=1.0, step=0.001)] = 0.2
    sde_end_percent: Annotated[float, Float(min=0.0, max=1.0, step=0.001)] = 0.8
    s_noise: Strength = 1.0
    predictor_order: Annotated[int, Int(min=1, max=6)] = 3
    corrector_order: Annotated[int, Int(min=0, max=6)] = 4
    use_pece: Annotated[bool, Boolean()] = False
    simple_order_2: Annotated[bool, Boolean()] = False

    def run(self, ctx: RunContext):
        model: DiffusionModel = self.model
        schedule = schedule_for(model.sampling)
        tau = sa_solver.tau_interval(schedule.percent_to_sigma(self.sde_start_percent),
                                     schedule.percent_to_sigma(self.sde_end_percent), eta=self.eta)
        return (_configured("sa_solver", tau_func=tau, s_noise=self.s_noise, predictor_order=self.predictor_order,
                            corrector_order=self.corrector_order, use_pece=self.use_pece,
                            simple_order_2=self.simple_order_2),)


class SamplerLCMUpscale(Node):
    category = SAMPLERS
    outputs = (Output(SAMPLER),)

    scale_ratio: Annotated[float, Float(min=0.1, max=20.0, step=0.01)] = 1.0
    scale_steps: Annotated[int, Int(min=-1, max=1000, step=1)] = -1
    upscale_method: Annotated[str, Combo(LCM_UPSCALE_METHODS)] = "bislerp"

    def run(self, ctx: RunContext):
        method = _check_choice(self.upscale_method, LCM_UPSCALE_METHODS, "upscale_method")
        steps = None if self.scale_steps < 0 else self.scale_steps
        return (Sampler("lcm_upscale", advanced_samplers.lcm_upscale,
                        {"total_upscale": self.scale_ratio, "upscale_steps": steps, "upscale_method": method}),)


# --- schedulers ------------------------------------------------------------------------------------------------

class PolyexponentialScheduler(Node):
    category = SCHEDULERS
    outputs = (Output(SIGMAS),)

    steps: StepsInput = 20
    sigma_max: SigmaInput = 14.614642
    sigma_min: SigmaInput = 0.0291675
    rho: Annotated[float, Float(min=0.0, max=100.0, step=0.01, round=False)] = 1.0

    def run(self, ctx: RunContext):
        # The schedule is uniform in log σ: both ends need a logarithm.
        return (schedules.polyexponential_sigmas(self.steps, _positive(self.sigma_min, "sigma_min"),
                                                 _positive(self.sigma_max, "sigma_max"), self.rho),)


class LaplaceScheduler(Node):
    category = SCHEDULERS
    outputs = (Output(SIGMAS),)

    steps: StepsInput = 20
    sigma_max: SigmaInput = 14.614642
    sigma_min: SigmaInput = 0.0291675
    mu: Annotated[float, Float(min=-10.0, max=10.0, step=0.1, round=False)] = 0.0
    beta: Annotated[float, Float(min=0.0, max=10.0, step=0.1, round=False)] = 0.5

    def run(self, ctx: RunContext):
        return (schedules.laplace_sigmas(self.steps, self.sigma_min, self.sigma_max, self.mu, self.beta),)


class VPScheduler(Node):
    category = SCHEDULERS
    outputs = (Output(SIGMAS),)

    steps: StepsInput = 20
    beta_d: SigmaInput = 19.9
    beta_min: SigmaInput = 0.1
    eps_s: Annotated[float, Float(min=0.0, max=1.0, step=0.0001, round=False)] = 0.001

    def run(self, ctx: RunContext):
        return (schedules.vp_sigmas(self.steps, self.beta_d, self.beta_min, self.eps_s),)


class BetaSamplingScheduler(Node):
    category = SCHEDULERS
    outputs = (Output(SIGMAS),)

    model: Annotated[Any, Socket(MODEL)]
    steps: StepsInput = 20
    alpha: Annotated[float, Float(min=0.0, max=50.0, step=0.01, round=False)] = 0.6
    beta: Annotated[float, Float(min=0.0, max=50.0, step=0.01, round=False)] = 0.6

    def run(self, ctx: RunContext):
        model: DiffusionModel = self.model
        # The Beta(α, β) distribution needs both shape parameters above 0.
        return (schedules.beta_sigmas(schedule_for(model.sampling), self.steps, _positive(self.alpha, "alpha"),
                                      _positive(self.beta, "beta")),)


class AlignYourStepsScheduler(Node):
    category = SCHEDULERS
    outputs = (Output(SIGMAS),)

    model_type: Annotated[str, Combo(sigma_tables.ALIGN_YOUR_STEPS_MODELS)] = "SD1"
    steps: Annotated[int, Int(min=1, max=10000)] = 10
    denoise: DenoiseInput = 1.0

    def run(self, ctx: RunContext):
        model_type = _check_choice(self.model_type, sigma_tables.ALIGN_YOUR_STEPS_MODELS, "model_type")
        return (sigma_tables.align_your_steps_sigmas(model_type, self.steps, self.denoise),)


class GITSScheduler(Node):
    category = SCHEDULERS
    outputs = (Output(SIGMAS),)

    coeff: Annotated[float, Float(min=0.8, max=1.5, step=0.05)] = 1.2
    steps: Annotated[int, Int(min=2, max=1000)] = 10
    denoise: DenoiseInput = 1.0

    def run(self, ctx: RunContext):
        if sigma_tables.gits_key(self.coeff) is None:
            raise InputError("coeff", f"is {self.coeff}; GITS has schedules for "
                             f"{', '.join(sigma_tables.gits_coefficients())} only")
        return (sigma_tables.gits_sigmas(self.coeff, self.steps, self.denoise),)


class OptimalStepsScheduler(Node):
    category = SCHEDULERS
    outputs = (Output(SIGMAS),)

    model_type: Annotated[str, Combo(sigma_tables.OPTIMAL_STEPS_MODELS)] = "FLUX"
    steps: Annotated[int, Int(min=3, max=1000)] = 20
    denoise: DenoiseInput = 1.0

    def run(self, ctx: RunContext):
        model_type = _check_choice(self.model_type, sigma_tables.OPTIMAL_STEPS_MODELS, "model_type")
        return (sigma_tables.optimal_steps_sigmas(model_type, self.steps, self.denoise),)


# --- operations on SIGMAS --------------------------------------------------------------------------------------

class SplitSigmas(Node):
    category = SIGMA_OPS
    outputs = (Output(SIGMAS, "high_sigmas"), Output(SIGMAS, "low_sigmas"))

    sigmas: Annotated[Any, Socket(SIGMAS)]
    step: Annotated[int, Int(min=0, max=10000)] = 0

    def run(self, ctx: RunContext):
        return schedules.split_sigmas(self.sigmas, self.step)


class SplitSigmasDenoise(Node):
    category = SIGMA_OPS
    outputs = (Output(SIGMAS, "high_sigmas"), Output(SIGMAS, "low_sigmas"))

    sigmas: Annotated[Any, Socket(SIGMAS)]
    denoise: DenoiseInput = 1.0

    def run(self, ctx: RunContext):
        return schedules.split_sigmas_denoise(self.sigmas, self.denoise)


class FlipSigmas(Node):
    category = SIGMA_OPS
    outputs = (Output(SIGMAS),)

    sigmas: Annotated[Any, Socket(SIGMAS)]

    def run(self, ctx: RunContext):
        return (schedules.flip_sigmas(self.sigmas),)


class SetFirstSigma(Node):
    category = SIGMA_OPS
    outputs = (Output(SIGMAS),)

    sigmas: Annotated[Any, Socket(SIGMAS)]
    sigma: Annotated[float, Float(min=0.0, max=20000.0, step=0.001, round=False)] = 136.0

    def run(self, ctx: RunContext):
        if len(self.sigmas) == 0:
            raise InputError("sigmas", "is empty: there is no first sigma to set")
        return (schedules.set_first_sigma(self.sigmas, self.sigma),)


class ExtendIntermediateSigmas(Node):
    category = SIGMA_OPS
    outputs = (Output(SIGMAS),)

    sigmas: Annotated[Any, Socket(SIGMAS)]
    steps: Annotated[int, Int(min=1, max=100)] = 2
    start_at_sigma: Annotated[float, Float(min=-1.0, max=20000.0, step=0.01, round=False)] = -1.0
    end_at_sigma: Annotated[float, Float(min=0.0, max=20000.0, step=0.01, round=False)] = 12.0
    spacing: Annotated[str, Combo(schedules.SIGMA_SPACINGS)] = "linear"

    def run(self, ctx: RunContext):
        spacing = _check_choice(self.spacing, schedules.SIGMA_SPACINGS, "spacing")
        return (schedules.extend_intermediate_sigmas(self.sigmas, self.steps, self.start_at_sigma,
                                                     self.end_at_sigma, spacing),)


class SamplingPercentToSigma(Node):
    category = SIGMA_OPS
    outputs = (Output(FLOAT, "sigma_value"),)

    model: Annotated[Any, Socket(MODEL)]
    sampling_percent: Annotated[float, Float(min=0.0, max=1.0, step=0.0001)] = 0.0
    return_actual_sigma: Annotated[bool, Boolean(
        tooltip="Return the actual sigma value instead of the value used for interval checks.\n"
                "This only affects results at 0.0 and 1.0.")] = False

    def run(self, ctx: RunContext):
        model: DiffusionModel = self.model
        return (schedules.sampling_percent_to_sigma(schedule_for(model.sampling), self.sampling_percent,
                                                    self.return_actual_sigma),)


# --- noise -----------------------------------------------------------------------------------------------------

class AddNoise(Node):
    category = "_for_testing/custom_sampling/noise"
    outputs = (Output(LATENT),)

    model: Annotated[Any, Socket(MODEL)]
    noise: Annotated[Any, Socket(NOISE)]
    sigmas: Annotated[Any, Socket(SIGMAS)]
    latent_image: Annotated[Any, Socket(LATENT)]

    def run(self, ctx: RunContext):
        """The latent noised to the schedule's span |σ_first − σ_last| (the one sigma when there is one), in the
        model's scaled space and back; an all-zero latent is not shifted first."""
        model: DiffusionModel = self.model
        latent = self.latent_image
        sigmas = self.sigmas
        if len(sigmas) == 0:
            return (latent,)
        _check_channels(latent, model)
        fmt = model.latent_format
        noise = self.noise.generate_noise(latent)
        scale = torch.abs(sigmas[0] - sigmas[-1]) if len(sigmas) > 1 else sigmas[0]
        samples = latent["samples"]
        if torch.count_nonzero(samples) > 0:
            samples = fmt.process_in(samples)
        noisy = torch.nan_to_num(fmt.process_out(noise * scale + samples), nan=0.0, posinf=0.0, neginf=0.0)
        out = dict(latent)
        out["samples"] = noisy
        return (out,)


NODES = [SamplerEulerAncestral, SamplerEulerAncestralCFGPP, SamplerEulerCFGpp, SamplerLMS, SamplerDPMPP_3M_SDE,
         SamplerDPMPP_2M_SDE, SamplerDPMPP_SDE, SamplerDPMPP_2S_Ancestral, SamplerDPMAdaptative, SamplerER_SDE,
         SamplerSASolver, SamplerLCMUpscale, PolyexponentialScheduler, LaplaceScheduler, VPScheduler,
         BetaSamplingScheduler, AlignYourStepsScheduler, GITSScheduler, OptimalStepsScheduler, SplitSigmas,
         SplitSigmasDenoise, FlipSigmas, SetFirstSigma, ExtendIntermediateSigmas, SamplingPercentToSigma, AddNoise]
