"""Nodes of the current model families that need no network of their own (ComfyUI's names and signatures): the
flow-matching ModelSampling* overrides (SD3, AuraFlow, Flux) and Stable Cascade's, the empty latents of the
16-, 64- and 3-channel families, and the conditioning options Flux / Kontext / edit models read (guidance,
reference latents). Each returns new objects; the inputs stay as they were.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Annotated, Any

import torch

from latentloom.engine.inputs import InputError
from latentloom.engine.node import Node, RunContext
from latentloom.engine.types import (
    CLIP,
    CONDITIONING,
    IMAGE,
    LATENT,
    MODEL,
    Boolean,
    Combo,
    Float,
    Int,
    Output,
    Socket,
)

from .conditioning import set_values
from .diffusion import flow
from .diffusion import patches as patch_api
from .diffusion.models import DiffusionModel
from .diffusion.resize import common_upscale
from .diffusion.schedules import flux_mu

MAX_RESOLUTION = 16384
SHIFT = dict(min=0.0, max=100.0, step=0.01)


def _positive_shift(shift: float) -> float:
    if not shift > 0:
        raise InputError("shift", f"must be above 0 (a shift of {shift} maps every timestep to σ = 0)")
    return shift


def _flow_sampling(model: DiffusionModel, schedule: str, shift: float, multiplier: float = 1000.0) -> DiffusionModel:
    sampling = dataclasses.replace(model.sampling, prediction="const", schedule=schedule, shift=shift,
                                   multiplier=multiplier, zsnr=False, sigma_data=1.0)
    return model.with_sampling(sampling)


class ModelSamplingSD3(Node):
    category = "advanced/model"
    outputs = (Output(MODEL),)
    model: Annotated[Any, Socket(MODEL)]
    shift: Annotated[float, Float(**SHIFT)] = 3.0

    def run(self, ctx: RunContext):
        return (_flow_sampling(self.model, "discrete_flow", _positive_shift(self.shift)),)


class ModelSamplingAuraFlow(Node):
    category = "advanced/model"
    outputs = (Output(MODEL),)
    model: Annotated[Any, Socket(MODEL)]
    shift: Annotated[float, Float(**SHIFT)] = 1.73

    def run(self, ctx: RunContext):
        # AuraFlow's network reads σ itself as its timestep (multiplier 1).
        return (_flow_sampling(self.model, "discrete_flow", _positive_shift(self.shift), multiplier=1.0),)


class ModelSamplingFlux(Node):
    category = "advanced/model"
    outputs = (Output(MODEL),)
    model: Annotated[Any, Socket(MODEL)]
    max_shift: Annotated[float, Float(**SHIFT)] = 1.15
    base_shift: Annotated[float, Float(**SHIFT)] = 0.5
    width: Annotated[int, Int(min=16, max=MAX_RESOLUTION, step=8)] = 1024
    height: Annotated[int, Int(min=16, max=MAX_RESOLUTION, step=8)] = 1024

    def run(self, ctx: RunContext):
        mu = flux_mu(self.max_shift, self.base_shift, self.width, self.height)
        return (_flow_sampling(self.model, "flux", mu, multiplier=1.0),)


class ModelSamplingStableCascade(Node):
    category = "advanced/model"
    outputs = (Output(MODEL),)
    model: Annotated[Any, Socket(MODEL)]
    shift: Annotated[float, Float(**SHIFT)] = 2.0

    def run(self, ctx: RunContext):
        model: DiffusionModel = self.model
        sampling = dataclasses.replace(model.sampling, prediction="eps", schedule="stable_cascade",
                                       shift=_positive_shift(self.shift), zsnr=False, sigma_data=1.0)
        return (model.with_sampling(sampling),)


# --- empty latents ---------------------------------------------------------------------------------------------

def _zeros(batch_size: int, channels: int, height: int, width: int) -> dict[str, torch.Tensor]:
    return {"samples": torch.zeros(batch_size, channels, height, width, dtype=torch.float32)}


class EmptySD3LatentImage(Node):
    category = "latent/sd3"
    outputs = (Output(LATENT),)
    width: Annotated[int, Int(min=16, max=MAX_RESOLUTION, step=16)] = 1024
    height: Annotated[int, Int(min=16, max=MAX_RESOLUTION, step=16)] = 1024
    batch_size: Annotated[int, Int(min=1, max=4096)] = 1

    def run(self, ctx: RunContext):
        return (_zeros(self.batch_size, 16, self.height // 8, self.width // 8),)  # SD3 / Flux: 16 channels, /8


class EmptyHunyuanImageLatent(Node):
    category = "latent"
    display_name = "EmptyHunyuanImageLatent"
    outputs = (Output(LATENT),)
    width: Annotated[int, Int(min=64, max=MAX_RESOLUTION, step=32)] = 2048
    height: Annotated[int, Int(min=64, max=MAX_RESOLUTION, step=32)] = 2048
    batch_size: Annotated[int, Int(min=1, max=4096)] = 1

    def run(self, ctx: RunContext):
        return (_zeros(self.batch_size, 64, self.height // 32, self.width // 32),)  # HunyuanImage 2.1: 64 ch, /32


class StableCascade_EmptyLatentImage(Node):  # noqa: N801 (ComfyUI's node type name)
    category = "latent/stable_cascade"
    outputs = (Output(LATENT, name="stage_c"), Output(LATENT, name="stage_b"))
    width: Annotated[int, Int(min=256, max=MAX_RESOLUTION, step=8)] = 1024
    height: Annotated[int, Int(min=256, max=MAX_RESOLUTION, step=8)] = 1024
    compression: Annotated[int, Int(min=4, max=128, step=1)] = 42
    batch_size: Annotated[int, Int(min=1, max=4096)] = 1

    def run(self, ctx: RunContext):
        stage_c = _zeros(self.batch_size, 16, self.height // self.compression, self.width // self.compression)
        stage_b = _zeros(self.batch_size, 4, self.height // 4, self.width // 4)
        return (stage_c, stage_b)


class EmptyChromaRadianceLatentImage(Node):
    category = "latent/chroma_radiance"
    outputs = (Output(LATENT),)
    width: Annotated[int, Int(min=16, max=MAX_RESOLUTION, step=16)] = 1024
    height: Annotated[int, Int(min=16, max=MAX_RESOLUTION, step=16)] = 1024
    batch_size: Annotated[int, Int(min=1, max=4096)] = 1

    def run(self, ctx: RunContext):
        return (_zeros(self.batch_size, 3, self.height, self.width),)  # Chroma Radiance works on pixels


# --- conditioning options --------------------------------------------------------------------------------------

class FluxGuidance(Node):
    category = "advanced/conditioning/flux"
    outputs = (Output(CONDITIONING),)
    conditioning: Annotated[Any, Socket(CONDITIONING)]
    guidance: Annotated[float, Float(min=0.0, max=100.0, step=0.1)] = 3.5

    def run(self, ctx: RunContext):
        return (set_values(self.conditioning, {"guidance": self.guidance}),)


class FluxDisableGuidance(Node):
    category = "advanced/conditioning/flux"
    description = "This node completely disables the guidance embed on Flux and Flux like models"
    outputs = (Output(CONDITIONING),)
    conditioning: Annotated[Any, Socket(CONDITIONING)]

    def run(self, ctx: RunContext):
        return (set_values(self.conditioning, {"guidance": None}),)


class FluxKontextImageScale(Node):
    category = "advanced/conditioning/flux"
    description = "This node resizes the image to one that is more optimal for flux kontext."
    outputs = (Output(IMAGE),)
    image: Annotated[Any, Socket(IMAGE)]

    def run(self, ctx: RunContext):
        image: torch.Tensor = self.image
        if image.shape[1] < 1 or image.shape[2] < 1:
            raise InputError("image", f"has no pixels (shape {tuple(image.shape)})")
        width, height = flow.kontext_resolution(image.shape[2], image.shape[1])
        scaled = common_upscale(image.movedim(-1, 1), width, height, "lanczos", "center")
        return (scaled.movedim(1, -1),)


class FluxKontextMultiReferenceLatentMethod(Node):
    category = "advanced/conditioning/flux"
    experimental = True
    outputs = (Output(CONDITIONING),)
    conditioning: Annotated[Any, Socket(CONDITIONING)]
    reference_latents_method: Annotated[str, Combo(("offset", "index", "uxo/uno"))] = "offset"

    def run(self, ctx: RunContext):
        method = "uxo" if "uxo" in self.reference_latents_method else self.reference_latents_method
        return (set_values(self.conditioning, {"reference_latents_method": method}),)


class ReferenceLatent(Node):
    category = "advanced/conditioning/edit_models"
    description = ("This node sets the guiding latent for an edit model. If the model supports it you can chain "
                   "multiple to set multiple reference images.")
    outputs = (Output(CONDITIONING),)
    conditioning: Annotated[Any, Socket(CONDITIONING)]
    latent: Annotated[Any, Socket(LATENT, optional=True)] = None

    def run(self, ctx: RunContext):
        if self.latent is None:
            return (self.conditioning,)
        samples = self.latent["samples"]
        # Appended to each entry's list, so chained nodes give several reference images.
        return ([[cond, {**options, "reference_latents": list(options.get("reference_latents") or []) + [samples]}]
                 for cond, options in self.conditioning],)


class T5TokenizerOptions(Node):
    category = "_for_testing/conditioning"
    experimental = True
    outputs = (Output(CLIP),)
    clip: Annotated[Any, Socket(CLIP)]
    min_padding: Annotated[int, Int(min=0, max=10000, step=1)] = 0
    min_length: Annotated[int, Int(min=0, max=10000, step=1)] = 0

    def run(self, ctx: RunContext):
        clip = self.clip
        options = dict(clip.options.get(flow.TOKENIZER_OPTIONS) or {})
        options.update(flow.t5_tokenizer_options(self.min_padding, self.min_length))
        return (dataclasses.replace(clip, options={**clip.options, flow.TOKENIZER_OPTIONS: options}),)


# --- model options ---------------------------------------------------------------------------------------------

class RenormCFG(Node):
    category = "advanced/model"
    outputs = (Output(MODEL),)
    model: Annotated[Any, Socket(MODEL)]
    cfg_trunc: Annotated[float, Float(min=0.0, max=100.0, step=0.01)] = 100
    renorm_cfg: Annotated[float, Float(min=0.0, max=100.0, step=0.01)] = 1.0

    def run(self, ctx: RunContext):
        model: DiffusionModel = self.model
        config = getattr(model.unet, "config", None)
        in_channels = getattr(config, "in_channels", None)
        return (model.set_sampler_cfg_function(flow.renorm_cfg_function(self.cfg_trunc, self.renorm_cfg,
                                                                        in_channels)),)


class ChromaRadianceOptions(Node):
    category = "model_patches/chroma_radiance"
    description = "Allows setting advanced options for the Chroma Radiance model."
    outputs = (Output(MODEL),)
    model: Annotated[Any, Socket(MODEL)]
    preserve_wrapper: Annotated[bool, Boolean()] = True
    start_sigma: Annotated[float, Float(min=0.0, max=1.0)] = 1.0
    end_sigma: Annotated[float, Float(min=0.0, max=1.0)] = 0.0
    nerf_tile_size: Annotated[int, Int(min=-1)] = -1

    def run(self, ctx: RunContext):
        model: DiffusionModel = self.model
        if self.nerf_tile_size < 0:  # nothing to override
            return (model,)
        previous = model.options.get(patch_api.FUNCTION_WRAPPER) if self.preserve_wrapper else None
        wrapper: Callable = flow.radiance_options_wrapper({"nerf_tile_size": self.nerf_tile_size},
                                                          self.start_sigma, self.end_sigma, previous)
        return (model.set_model_unet_function_wrapper(wrapper),)


NODES = [ModelSamplingSD3, ModelSamplingAuraFlow, ModelSamplingFlux, ModelSamplingStableCascade, EmptySD3LatentImage,
         EmptyHunyuanImageLatent, StableCascade_EmptyLatentImage, EmptyChromaRadianceLatentImage, FluxGuidance,
         FluxDisableGuidance, FluxKontextImageScale, FluxKontextMultiReferenceLatentMethod, ReferenceLatent,
         T5TokenizerOptions, RenormCFG, ChromaRadianceOptions]
