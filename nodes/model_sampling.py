"""Model-option nodes (ComfyUI's names and signatures): the ModelSampling* schedule / prediction overrides,
ModelComputeDtype, TorchCompileModel and PatchModelAddDownscale (Kohya Deep Shrink). Each returns a clone of its
MODEL; the input model and every other branch of the graph stay as they were.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any

import torch

from latentloom.engine.inputs import InputError
from latentloom.engine.node import Node, RunContext
from latentloom.engine.types import MODEL, Boolean, Combo, Float, Int, Output, Socket

from .diffusion import compute, deep_shrink
from .diffusion.models import PLAYGROUND_V25_LATENT, DiffusionModel
from .diffusion.schedules import schedule_for

SIGMA_LIMIT = dict(min=0.0, max=1000.0, step=0.001, round=False)

# ModelSamplingDiscrete's choices: (prediction type, schedule kind).
DISCRETE_SAMPLING: dict[str, tuple[str, str]] = {
    "eps": ("eps", "discrete"),
    "v_prediction": ("v", "discrete"),
    "lcm": ("lcm", "discrete_distilled"),
    "x0": ("x0", "discrete"),
    "img_to_img": ("img_to_img", "discrete"),
}
# ModelSamplingContinuousEDM's choices: (prediction type, schedule kind, sigma_data).
CONTINUOUS_EDM_SAMPLING: dict[str, tuple[str, str, float]] = {
    "v_prediction": ("v", "continuous_edm", 1.0),
    "edm": ("edm", "continuous_edm", 0.5),
    "edm_playground_v2.5": ("edm", "continuous_edm", 0.5),
    "eps": ("eps", "continuous_edm", 1.0),
    "cosmos_rflow": ("cosmos_rflow", "cosmos_rflow", 1.0),
}


class ModelSamplingDiscrete(Node):
    category = "advanced/model"
    outputs = (Output(MODEL),)
    model: Annotated[Any, Socket(MODEL)]
    sampling: Annotated[str, Combo(tuple(DISCRETE_SAMPLING))] = "eps"
    zsnr: Annotated[bool, Boolean()] = False

    def run(self, ctx: RunContext):
        model: DiffusionModel = self.model
        prediction, schedule = DISCRETE_SAMPLING[self.sampling]
        # The model's own betas, read with another prediction type (and optionally zero terminal SNR).
        sampling = dataclasses.replace(model.sampling, prediction=prediction, schedule=schedule, zsnr=self.zsnr,
                                       sigma_data=1.0)
        return (model.with_sampling(sampling),)


def _continuous_range(sigma_min: float, sigma_max: float) -> None:
    if not sigma_min > 0:
        raise InputError("sigma_min", f"must be above 0 (the schedule is log-uniform), got {sigma_min}")
    if not sigma_max > sigma_min:
        raise InputError("sigma_max", f"must be above sigma_min ({sigma_min}), got {sigma_max}")


class ModelSamplingContinuousEDM(Node):
    category = "advanced/model"
    outputs = (Output(MODEL),)
    model: Annotated[Any, Socket(MODEL)]
    sampling: Annotated[str, Combo(tuple(CONTINUOUS_EDM_SAMPLING))] = "v_prediction"
    sigma_max: Annotated[float, Float(**SIGMA_LIMIT)] = 120.0
    sigma_min: Annotated[float, Float(**SIGMA_LIMIT)] = 0.002

    def run(self, ctx: RunContext):
        model: DiffusionModel = self.model
        _continuous_range(self.sigma_min, self.sigma_max)
        prediction, schedule, sigma_data = CONTINUOUS_EDM_SAMPLING[self.sampling]
        sampling = dataclasses.replace(model.sampling, prediction=prediction, schedule=schedule, zsnr=False,
                                       sigma_min=self.sigma_min, sigma_max=self.sigma_max, sigma_data=sigma_data)
        if self.sampling == "edm_playground_v2.5":  # Playground v2.5 also normalises its latents per channel
            return (model.clone(sampling=sampling, latent_format=PLAYGROUND_V25_LATENT),)
        return (model.with_sampling(sampling),)


class ModelSamplingContinuousV(Node):
    category = "advanced/model"
    outputs = (Output(MODEL),)
    model: Annotated[Any, Socket(MODEL)]
    sampling: Annotated[str, Combo(("v_prediction",))] = "v_prediction"
    sigma_max: Annotated[float, Float(**SIGMA_LIMIT)] = 500.0
    sigma_min: Annotated[float, Float(**SIGMA_LIMIT)] = 0.03

    def run(self, ctx: RunContext):
        model: DiffusionModel = self.model
        _continuous_range(self.sigma_min, self.sigma_max)
        sampling = dataclasses.replace(model.sampling, prediction="v", schedule="continuous_v", zsnr=False,
                                       sigma_min=self.sigma_min, sigma_max=self.sigma_max, sigma_data=1.0)
        return (model.with_sampling(sampling),)


class ModelComputeDtype(Node):
    category = "advanced/debug/model"
    outputs = (Output(MODEL),)
    model: Annotated[Any, Socket(MODEL)]
    dtype: Annotated[str, Combo(tuple(compute.COMPUTE_DTYPES))] = "default"

    def run(self, ctx: RunContext):
        model: DiffusionModel = self.model
        dtype = compute.COMPUTE_DTYPES[self.dtype]
        if dtype is None:  # back to the dtype of the weights
            options = dict(model.options)
            options.pop(compute.COMPUTE_DTYPE, None)
            return (model.clone(options=options),)
        return (model.with_option(compute.COMPUTE_DTYPE, dtype),)


class TorchCompileModel(Node):
    category = "_for_testing"
    experimental = True
    outputs = (Output(MODEL),)
    model: Annotated[Any, Socket(MODEL)]
    backend: Annotated[str, Combo(compute.COMPILE_BACKENDS)] = "inductor"

    def run(self, ctx: RunContext):
        if self.backend == "cudagraphs" and not torch.cuda.is_available():
            raise InputError("backend", "cudagraphs needs a CUDA device; use inductor on this machine")
        return (self.model.with_option(compute.TORCH_COMPILE, compute.TorchCompile(self.backend)),)


class PatchModelAddDownscale(Node):
    category = "model_patches/unet"
    display_name = "PatchModelAddDownscale (Kohya Deep Shrink)"
    outputs = (Output(MODEL),)
    model: Annotated[Any, Socket(MODEL)]
    block_number: Annotated[int, Int(min=1, max=32, step=1)] = 3
    downscale_factor: Annotated[float, Float(min=0.1, max=9.0, step=0.001)] = 2.0
    start_percent: Annotated[float, Float(min=0.0, max=1.0, step=0.001)] = 0.0
    end_percent: Annotated[float, Float(min=0.0, max=1.0, step=0.001)] = 0.35
    downscale_after_skip: Annotated[bool, Boolean()] = True
    downscale_method: Annotated[str, Combo(deep_shrink.RESIZE_METHODS)] = "bicubic"
    upscale_method: Annotated[str, Combo(deep_shrink.RESIZE_METHODS)] = "bicubic"

    def run(self, ctx: RunContext):
        model: DiffusionModel = self.model
        schedule = schedule_for(model.sampling)
        shrink = deep_shrink.downscale_patch(self.block_number, self.downscale_factor,
                                             schedule.percent_to_sigma(self.start_percent),
                                             schedule.percent_to_sigma(self.end_percent), self.downscale_method)
        if self.downscale_after_skip:
            patched = model.set_model_input_block_patch_after_skip(shrink)
        else:
            patched = model.set_model_input_block_patch(shrink)
        return (patched.set_model_output_block_patch(deep_shrink.match_skip_patch(self.upscale_method)),)


NODES = [ModelSamplingDiscrete, ModelSamplingContinuousEDM, ModelSamplingContinuousV, ModelComputeDtype,
         TorchCompileModel, PatchModelAddDownscale]
