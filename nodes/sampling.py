"""Sampling nodes: KSampler, KSamplerAdvanced and the custom-sampling family (ComfyUI's names, inputs, numerics).

The maths lives in nodes.diffusion (schedules, noise, samplers, denoiser); these classes only check inputs, pick
the pieces and report progress with a latent preview after every step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import torch

from latentloom.engine.inputs import InputError
from latentloom.engine.node import Node, RunContext
from latentloom.engine.types import (
    CONDITIONING,
    GUIDER,
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

from .diffusion.denoiser import Guider
from .diffusion.models import DiffusionModel
from .diffusion.noise import initial_noise
from .diffusion.preview import preview_jpeg
from .diffusion.samplers import SAMPLER_NAMES, Sampler, sampler_for_name
from .diffusion.schedules import (
    SCHEDULER_NAMES,
    advanced_sigmas,
    basic_scheduler_sigmas,
    denoise_sigmas,
    exponential_sigmas,
    karras_sigmas,
    schedule_for,
    sd_turbo_sigmas,
)

MAX_SEED = 0xFFFFFFFFFFFFFFFF
CUSTOM = "sampling/custom_sampling"


# --- noise objects (what NOISE links carry) ------------------------------------------------------------------

@dataclass(frozen=True)
class RandomNoiseSource:
    seed: int

    def generate_noise(self, latent: dict) -> torch.Tensor:
        return initial_noise(latent["samples"], self.seed, latent.get("batch_index"))


@dataclass(frozen=True)
class NoNoise:
    seed: int = 0

    def generate_noise(self, latent: dict) -> torch.Tensor:
        return torch.zeros(latent["samples"].shape, dtype=torch.float32)


# --- input checks (the socket value checks in socket_values ran before; these compare inputs with each other) ---

def _check_channels(latent: dict, model: DiffusionModel, name: str = "latent_image") -> dict:
    """The latent must have the model's latent channel count (inpainting UNets take their extra channels from
    the conditioning, not from the latent)."""
    channels, expected = latent["samples"].shape[1], model.latent_format.channels
    if channels != expected:
        raise InputError(name, f"has {channels} channels, but this {model.family} model works on "
                         f"{expected}-channel latents (a latent made for another model family?)")
    return latent


def _context_width(model: DiffusionModel) -> int | None:
    """The text-embedding width the UNet's cross-attention takes (its input projection's, where it has one)."""
    config = getattr(model.unet, "config", None)
    width = getattr(config, "encoder_hid_dim", None) or getattr(config, "cross_attention_dim", None)
    return width if isinstance(width, int) else None


def _check_context_width(conditioning: list, name: str, model: DiffusionModel) -> list:
    expected = _context_width(model)
    for tensor, _ in conditioning:
        if expected is not None and tensor.shape[-1] != expected:
            raise InputError(name, f"holds {tensor.shape[-1]}-wide text embeddings, but this {model.family} model "
                             f"takes {expected}-wide ones (encoded with another model's CLIP?)")
    return conditioning


def _check_choice(value: str, choices: tuple[str, ...], name: str) -> str:
    if value not in choices:
        raise InputError(name, f"is '{value}', not one of: {', '.join(choices)}")
    return value


# --- the shared run ------------------------------------------------------------------------------------------

def wants_previews(ctx: RunContext) -> bool:
    """Whether the run asked for live previews: the server passes the prompt's preview method (ComfyUI's
    --preview-method, default none) in extra_data; a headless run without one makes none, saving a JPEG a step."""
    return ctx.extra_data.get("preview_method", "none") != "none"


def _progress_callback(ctx: RunContext, model: DiffusionModel, x0_sink: dict | None = None) -> Callable:
    previews = wants_previews(ctx)

    def report(step: int, denoised: torch.Tensor, x: torch.Tensor, total: int) -> None:
        if x0_sink is not None:
            x0_sink["x0"] = denoised
        jpeg = preview_jpeg(denoised, model.latent_format) if previews else None
        # dpm_adaptive takes as many steps as it needs: keep the bar within its total.
        ctx.progress(min(step + 1, total), total, ("image/jpeg", jpeg) if jpeg is not None else None)
    return report


def _sample(ctx: RunContext, guider: Guider, noise: torch.Tensor, latent: dict, sampler: Sampler, sigmas: torch.Tensor,
            seed: int, x0_sink: dict | None = None) -> dict:
    samples = guider.sample(noise, latent["samples"], sampler, sigmas, denoise_mask=latent.get("noise_mask"),
                            callback=_progress_callback(ctx, guider.model, x0_sink), seed=seed,
                            manager=ctx.models)
    out = dict(latent)
    out["samples"] = samples
    return out


def common_ksampler(ctx: RunContext, model: DiffusionModel, seed: int, steps: int, cfg: float, sampler_name: str,
                    scheduler: str, positive: list, negative: list, latent: dict, denoise: float = 1.0,
                    disable_noise: bool = False, start_step: int | None = None, last_step: int | None = None,
                    force_full_denoise: bool = False) -> tuple[dict]:
    latent = _check_channels(latent, model)
    positive = _check_context_width(positive, "positive", model)
    negative = _check_context_width(negative, "negative", model)
    sampler = sampler_for_name(_check_choice(sampler_name, SAMPLER_NAMES, "sampler_name"))
    _check_choice(scheduler, SCHEDULER_NAMES, "scheduler")
    samples = latent["samples"]
    if disable_noise:
        noise = torch.zeros(samples.shape, dtype=torch.float32)
    else:
        noise = initial_noise(samples, seed, latent.get("batch_index"))
    schedule = schedule_for(model.sampling)
    sigmas = denoise_sigmas(schedule, scheduler, steps, denoise, sampler.drops_penultimate)
    if last_step is not None or start_step is not None:
        truncated = advanced_sigmas(sigmas, start_step or 0, last_step if last_step is not None else len(sigmas),
                                    force_full_denoise)
        if truncated is None:  # starts at or past the end: nothing to do
            return (dict(latent),)
        sigmas = truncated
    guider = Guider(model, {"positive": positive, "negative": negative}, cfg)
    return (_sample(ctx, guider, noise, latent, sampler, sigmas, seed),)


# --- nodes ---------------------------------------------------------------------------------------------------

SeedInput = Annotated[int, Int(min=0, max=MAX_SEED, control_after_generate=True,
                               tooltip="The random seed used for creating the noise.")]
CfgInput = Annotated[float, Float(min=0.0, max=100.0, step=0.1, round=0.01,
                                  tooltip="Classifier-free guidance scale.")]


class KSampler(Node):
    category = "sampling"
    description = "Uses the provided model, positive and negative conditioning to denoise the latent image."
    outputs = (Output(LATENT, tooltip="The denoised latent."),)

    model: Annotated[Any, Socket(MODEL, tooltip="The model used for denoising the input latent.")]
    seed: SeedInput = 0
    steps: Annotated[int, Int(min=1, max=10000, tooltip="The number of steps used in the denoising process.")] = 20
    cfg: CfgInput = 8.0
    sampler_name: Annotated[str, Combo(SAMPLER_NAMES, tooltip="The algorithm used when sampling.")] = "euler"
    scheduler: Annotated[str, Combo(SCHEDULER_NAMES, tooltip="How noise is removed over the steps.")] = "simple"
    positive: Annotated[Any, Socket(CONDITIONING, tooltip="What to include in the image.")]
    negative: Annotated[Any, Socket(CONDITIONING, tooltip="What to exclude from the image.")]
    latent_image: Annotated[Any, Socket(LATENT, tooltip="The latent image to denoise.")]
    denoise: Annotated[float, Float(min=0.0, max=1.0, step=0.01,
                                    tooltip="The amount of denoising applied.")] = 1.0

    def run(self, ctx: RunContext):
        return common_ksampler(ctx, self.model, self.seed, self.steps, self.cfg, self.sampler_name,
                               self.scheduler, self.positive, self.negative, self.latent_image,
                               denoise=self.denoise)


class KSamplerAdvanced(Node):
    display_name = "KSampler (Advanced)"
    category = "sampling"
    outputs = (Output(LATENT),)

    model: Annotated[Any, Socket(MODEL)]
    add_noise: Annotated[str, Combo(("enable", "disable"))] = "enable"
    noise_seed: SeedInput = 0
    steps: Annotated[int, Int(min=1, max=10000)] = 20
    cfg: CfgInput = 8.0
    sampler_name: Annotated[str, Combo(SAMPLER_NAMES)] = "euler"
    scheduler: Annotated[str, Combo(SCHEDULER_NAMES)] = "simple"
    positive: Annotated[Any, Socket(CONDITIONING)]
    negative: Annotated[Any, Socket(CONDITIONING)]
    latent_image: Annotated[Any, Socket(LATENT)]
    start_at_step: Annotated[int, Int(min=0, max=10000)] = 0
    end_at_step: Annotated[int, Int(min=0, max=10000)] = 10000
    return_with_leftover_noise: Annotated[str, Combo(("disable", "enable"))] = "disable"

    def run(self, ctx: RunContext):
        _check_choice(self.add_noise, ("enable", "disable"), "add_noise")
        _check_choice(self.return_with_leftover_noise, ("disable", "enable"), "return_with_leftover_noise")
        return common_ksampler(ctx, self.model, self.noise_seed, self.steps, self.cfg, self.sampler_name,
                               self.scheduler, self.positive, self.negative, self.latent_image, denoise=1.0,
                               disable_noise=self.add_noise == "disable", start_step=self.start_at_step,
                               last_step=self.end_at_step,
                               force_full_denoise=self.return_with_leftover_noise != "enable")


def _custom_outputs(latent: dict, out: dict, model: DiffusionModel, x0_sink: dict) -> tuple[dict, dict]:
    """(output, denoised_output): the second is the last x0 estimate, unscaled (the output when none ran)."""
    if "x0" not in x0_sink:
        return out, out
    denoised = dict(latent)
    denoised["samples"] = model.latent_format.process_out(x0_sink["x0"].float().cpu())
    return out, denoised


class SamplerCustom(Node):
    category = CUSTOM
    outputs = (Output(LATENT, "output"), Output(LATENT, "denoised_output"))

    model: Annotated[Any, Socket(MODEL)]
    add_noise: Annotated[bool, Boolean()] = True
    noise_seed: SeedInput = 0
    cfg: CfgInput = 8.0
    positive: Annotated[Any, Socket(CONDITIONING)]
    negative: Annotated[Any, Socket(CONDITIONING)]
    sampler: Annotated[Any, Socket(SAMPLER)]
    sigmas: Annotated[Any, Socket(SIGMAS)]
    latent_image: Annotated[Any, Socket(LATENT)]

    def run(self, ctx: RunContext):
        model: DiffusionModel = self.model
        latent = dict(_check_channels(self.latent_image, model))
        sigmas = self.sigmas
        source = RandomNoiseSource(self.noise_seed) if self.add_noise else NoNoise()
        guider = Guider(model, {"positive": _check_context_width(self.positive, "positive", model),
                                "negative": _check_context_width(self.negative, "negative", model)}, self.cfg)
        x0_sink: dict = {}
        out = _sample(ctx, guider, source.generate_noise(latent), latent, self.sampler, sigmas, self.noise_seed,
                      x0_sink)
        return _custom_outputs(latent, out, model, x0_sink)


class SamplerCustomAdvanced(Node):
    category = CUSTOM
    outputs = (Output(LATENT, "output"), Output(LATENT, "denoised_output"))

    noise: Annotated[Any, Socket(NOISE)]
    guider: Annotated[Any, Socket(GUIDER)]
    sampler: Annotated[Any, Socket(SAMPLER)]
    sigmas: Annotated[Any, Socket(SIGMAS)]
    latent_image: Annotated[Any, Socket(LATENT)]

    def run(self, ctx: RunContext):
        latent = dict(self.latent_image)
        sigmas = self.sigmas
        _check_channels(latent, self.guider.model)
        x0_sink: dict = {}
        out = _sample(ctx, self.guider, self.noise.generate_noise(latent), latent, self.sampler, sigmas,
                      self.noise.seed, x0_sink)
        return _custom_outputs(latent, out, self.guider.model, x0_sink)


class KSamplerSelect(Node):
    category = f"{CUSTOM}/samplers"
    outputs = (Output(SAMPLER),)

    sampler_name: Annotated[str, Combo(SAMPLER_NAMES)] = "euler"

    def run(self, ctx: RunContext):
        return (sampler_for_name(_check_choice(self.sampler_name, SAMPLER_NAMES, "sampler_name")),)


StepsInput = Annotated[int, Int(min=1, max=10000)]
DenoiseInput = Annotated[float, Float(min=0.0, max=1.0, step=0.01)]
SigmaInput = Annotated[float, Float(min=0.0, max=5000.0, step=0.01, round=False)]


class BasicScheduler(Node):
    category = f"{CUSTOM}/schedulers"
    outputs = (Output(SIGMAS),)

    model: Annotated[Any, Socket(MODEL)]
    scheduler: Annotated[str, Combo(SCHEDULER_NAMES)] = "simple"
    steps: StepsInput = 20
    denoise: DenoiseInput = 1.0

    def run(self, ctx: RunContext):
        model: DiffusionModel = self.model
        scheduler = _check_choice(self.scheduler, SCHEDULER_NAMES, "scheduler")
        return (basic_scheduler_sigmas(schedule_for(model.sampling), scheduler, self.steps, self.denoise),)


class KarrasScheduler(Node):
    category = f"{CUSTOM}/schedulers"
    outputs = (Output(SIGMAS),)

    steps: StepsInput = 20
    sigma_max: SigmaInput = 14.614642
    sigma_min: SigmaInput = 0.0291675
    rho: Annotated[float, Float(min=0.0, max=100.0, step=0.01, round=False)] = 7.0

    def run(self, ctx: RunContext):
        return (karras_sigmas(self.steps, self.sigma_min, self.sigma_max, self.rho),)


class ExponentialScheduler(Node):
    category = f"{CUSTOM}/schedulers"
    outputs = (Output(SIGMAS),)

    steps: StepsInput = 20
    sigma_max: SigmaInput = 14.614642
    sigma_min: SigmaInput = 0.0291675

    def run(self, ctx: RunContext):
        return (exponential_sigmas(self.steps, self.sigma_min, self.sigma_max),)


class SDTurboScheduler(Node):
    category = f"{CUSTOM}/schedulers"
    outputs = (Output(SIGMAS),)

    model: Annotated[Any, Socket(MODEL)]
    steps: Annotated[int, Int(min=1, max=10)] = 1
    denoise: DenoiseInput = 1.0

    def run(self, ctx: RunContext):
        model: DiffusionModel = self.model
        return (sd_turbo_sigmas(schedule_for(model.sampling), self.steps, self.denoise),)


class RandomNoise(Node):
    category = f"{CUSTOM}/noise"
    outputs = (Output(NOISE),)

    noise_seed: SeedInput = 0

    def run(self, ctx: RunContext):
        return (RandomNoiseSource(self.noise_seed),)


class DisableNoise(Node):
    category = f"{CUSTOM}/noise"
    outputs = (Output(NOISE),)

    def run(self, ctx: RunContext):
        return (NoNoise(),)


class CFGGuider(Node):
    category = f"{CUSTOM}/guiders"
    outputs = (Output(GUIDER),)

    model: Annotated[Any, Socket(MODEL)]
    positive: Annotated[Any, Socket(CONDITIONING)]
    negative: Annotated[Any, Socket(CONDITIONING)]
    cfg: CfgInput = 8.0

    def run(self, ctx: RunContext):
        model: DiffusionModel = self.model
        return (Guider(model, {"positive": _check_context_width(self.positive, "positive", model),
                               "negative": _check_context_width(self.negative, "negative", model)}, self.cfg),)


class BasicGuider(Node):
    category = f"{CUSTOM}/guiders"
    outputs = (Output(GUIDER),)

    model: Annotated[Any, Socket(MODEL)]
    conditioning: Annotated[Any, Socket(CONDITIONING)]

    def run(self, ctx: RunContext):
        model: DiffusionModel = self.model
        return (Guider(model, {"positive": _check_context_width(self.conditioning, "conditioning", model)}),)


NODES = [KSampler, KSamplerAdvanced, SamplerCustom, SamplerCustomAdvanced, KSamplerSelect, BasicScheduler,
         KarrasScheduler, ExponentialScheduler, SDTurboScheduler, RandomNoise, DisableNoise, CFGGuider, BasicGuider]
