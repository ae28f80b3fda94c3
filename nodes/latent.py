"""Latent nodes: empty latents, upscaling, batches, noise masks and compositing (ComfyUI's names and numerics).

LATENT = {"samples": [B,4,H/8,W/8] unscaled, optional "noise_mask" [B or 1,1,h,w], optional "batch_index"}.
Nodes copy the dict, so keys they do not touch (noise_mask, batch_index) pass through unchanged.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

import torch

from latentloom.engine.inputs import InputError
from latentloom.engine.node import Node, RunContext
from latentloom.engine.types import LATENT, MASK, Combo, Float, Int, Output, Socket

from .diffusion.resize import CROP_METHODS, LATENT_UPSCALE_METHODS, common_upscale

MAX_RESOLUTION = 16384


def _masks_per_item(masks: torch.Tensor, count: int) -> torch.Tensor:
    """Cycle a batch of masks until there is one per latent (masks shorter than the batch repeat)."""
    if masks.shape[0] < count:
        masks = masks.repeat(math.ceil(count / masks.shape[0]), 1, 1, 1)[:count]
    return masks


class EmptyLatentImage(Node):
    display_name = "Empty Latent Image"
    category = "latent"
    description = "Create a new batch of empty latent images to be denoised via sampling."
    outputs = (Output(LATENT),)

    width: Annotated[int, Int(min=16, max=MAX_RESOLUTION, step=8,
                              tooltip="The width of the latent images in pixels.")] = 512
    height: Annotated[int, Int(min=16, max=MAX_RESOLUTION, step=8,
                               tooltip="The height of the latent images in pixels.")] = 512
    batch_size: Annotated[int, Int(min=1, max=4096, tooltip="The number of latent images in the batch.")] = 1

    def run(self, ctx: RunContext):
        samples = torch.zeros(self.batch_size, 4, self.height // 8, self.width // 8, dtype=torch.float32)
        return ({"samples": samples},)


class LatentUpscale(Node):
    display_name = "Upscale Latent"
    category = "latent"
    outputs = (Output(LATENT),)

    samples: Annotated[Any, Socket(LATENT)]
    upscale_method: Annotated[str, Combo(LATENT_UPSCALE_METHODS)] = "nearest-exact"
    width: Annotated[int, Int(min=0, max=MAX_RESOLUTION, step=8)] = 512
    height: Annotated[int, Int(min=0, max=MAX_RESOLUTION, step=8)] = 512
    crop: Annotated[str, Combo(CROP_METHODS)] = "disabled"

    def run(self, ctx: RunContext):
        samples = self.samples["samples"]
        width, height = self.width, self.height
        if width == 0 and height == 0:
            return (self.samples,)
        # One side 0 keeps the aspect ratio; sizes here are pixels, at least 64 (both given, too).
        if width == 0:
            height = max(64, height)
            width = max(64, round(samples.shape[-1] * height / samples.shape[-2]))
        elif height == 0:
            width = max(64, width)
            height = max(64, round(samples.shape[-2] * width / samples.shape[-1]))
        else:
            width, height = max(64, width), max(64, height)
        out = dict(self.samples)
        out["samples"] = common_upscale(samples, width // 8, height // 8, self.upscale_method, self.crop)
        return (out,)


class LatentUpscaleBy(Node):
    display_name = "Upscale Latent By"
    category = "latent"
    outputs = (Output(LATENT),)

    samples: Annotated[Any, Socket(LATENT)]
    upscale_method: Annotated[str, Combo(LATENT_UPSCALE_METHODS)] = "nearest-exact"
    scale_by: Annotated[float, Float(min=0.01, max=8.0, step=0.01)] = 1.5

    def run(self, ctx: RunContext):
        samples = self.samples["samples"]
        width = round(samples.shape[-1] * self.scale_by)
        height = round(samples.shape[-2] * self.scale_by)
        if width < 1 or height < 1:
            raise InputError("scale_by", f"{self.scale_by} makes the latent empty")
        out = dict(self.samples)
        out["samples"] = common_upscale(samples, width, height, self.upscale_method, "disabled")
        return (out,)


class SetLatentNoiseMask(Node):
    display_name = "Set Latent Noise Mask"
    category = "latent/inpaint"
    outputs = (Output(LATENT),)

    samples: Annotated[Any, Socket(LATENT)]
    mask: Annotated[Any, Socket(MASK)]

    def run(self, ctx: RunContext):
        out = dict(self.samples)
        out["noise_mask"] = self.mask.reshape(-1, 1, self.mask.shape[-2], self.mask.shape[-1])
        return (out,)


class LatentFromBatch(Node):
    display_name = "Latent From Batch"
    category = "latent/batch"
    outputs = (Output(LATENT),)

    samples: Annotated[Any, Socket(LATENT)]
    batch_index: Annotated[int, Int(min=0, max=63)] = 0
    length: Annotated[int, Int(min=1, max=64)] = 1

    def run(self, ctx: RunContext):
        samples = self.samples["samples"]
        count = samples.shape[0]
        start = min(count - 1, self.batch_index)
        length = min(count - start, self.length)
        out = dict(self.samples)
        out["samples"] = samples[start:start + length].clone()
        if "noise_mask" in self.samples:
            masks = self.samples["noise_mask"]
            if masks.shape[0] == 1:
                out["noise_mask"] = masks.clone()
            else:
                out["noise_mask"] = _masks_per_item(masks, count)[start:start + length].clone()
        if "batch_index" in self.samples:
            out["batch_index"] = self.samples["batch_index"][start:start + length]
        else:
            # Remember which noise the picked items had in the full batch, so re-sampling reproduces them.
            out["batch_index"] = list(range(start, start + length))
        return (out,)


class RepeatLatentBatch(Node):
    display_name = "Repeat Latent Batch"
    category = "latent/batch"
    outputs = (Output(LATENT),)

    samples: Annotated[Any, Socket(LATENT)]
    amount: Annotated[int, Int(min=1, max=64)] = 1

    def run(self, ctx: RunContext):
        samples = self.samples["samples"]
        out = dict(self.samples)
        out["samples"] = samples.repeat(self.amount, 1, 1, 1)
        masks = self.samples.get("noise_mask")
        # ComfyUI repeats a per-item mask batch as it is (a single mask already applies to every item).
        if masks is not None and masks.shape[0] > 1:
            out["noise_mask"] = masks.repeat(self.amount, 1, 1, 1)
        if "batch_index" in self.samples:
            indices = list(self.samples["batch_index"])
            offset = max(indices) - min(indices) + 1
            out["batch_index"] = indices + [i + copy * offset for copy in range(1, self.amount) for i in indices]
        return (out,)


class LatentComposite(Node):
    display_name = "Latent Composite"
    category = "latent"
    outputs = (Output(LATENT),)

    samples_to: Annotated[Any, Socket(LATENT)]
    samples_from: Annotated[Any, Socket(LATENT)]
    x: Annotated[int, Int(min=0, max=MAX_RESOLUTION, step=8)] = 0
    y: Annotated[int, Int(min=0, max=MAX_RESOLUTION, step=8)] = 0
    feather: Annotated[int, Int(min=0, max=MAX_RESOLUTION, step=8)] = 0

    def run(self, ctx: RunContext):
        target = self.samples_to["samples"]
        source = self.samples_from["samples"]
        x, y, feather = self.x // 8, self.y // 8, self.feather // 8
        result = target.clone()
        # The pasted part is clipped to the target's extent.
        source = source[:, :, :max(0, target.shape[2] - y), :max(0, target.shape[3] - x)]
        height, width = source.shape[2], source.shape[3]
        region = result[:, :, y:y + height, x:x + width]
        if feather == 0:
            region[...] = source
        else:
            # Linear ramp (t+1)/feather on each side that borders the target's interior (not the target's edge).
            ramp = torch.arange(1, feather + 1, dtype=torch.float32) / feather
            rows, cols = torch.ones(height), torch.ones(width)
            n_rows, n_cols = min(feather, height), min(feather, width)
            if y != 0:
                rows[:n_rows] *= ramp[:n_rows]
            if y + height < target.shape[2]:
                rows[height - n_rows:] *= ramp[:n_rows].flip(0)
            if x != 0:
                cols[:n_cols] *= ramp[:n_cols]
            if x + width < target.shape[3]:
                cols[width - n_cols:] *= ramp[:n_cols].flip(0)
            weight = (rows[:, None] * cols[None, :]).to(source.dtype)
            region[...] = source * weight + region * (1.0 - weight)
        out = dict(self.samples_to)
        out["samples"] = result
        return (out,)


NODES = [EmptyLatentImage, LatentUpscale, LatentUpscaleBy, SetLatentNoiseMask, LatentFromBatch, RepeatLatentBatch,
         LatentComposite]
