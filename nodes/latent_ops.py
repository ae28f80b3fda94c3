"""Latent arithmetic, batching and transforms, and the LATENT_OPERATION nodes (ComfyUI's names and numerics:
nodes.py's LatentCrop/Flip/Rotate/Blend, comfy_extras nodes_latent.py, nodes_mask.py's LatentCompositeMasked and
nodes_rebatch.py's RebatchLatents). The older latent nodes (upscale, composite, batch picking) are in latent.py.

Like ComfyUI, each node copies the first latent's dict, so keys it does not touch (noise_mask, batch_index) pass
through from that input. The maths shared with other nodes is in diffusion/latent_operations.py.
"""

from __future__ import annotations

from typing import Annotated, Any

import torch

from latentloom.engine.inputs import InputError
from latentloom.engine.node import Node, RunContext
from latentloom.engine.types import LATENT, MASK, MODEL, Boolean, Combo, Float, Int, Output, Socket

from .diffusion.latent_operations import (
    LATENT_OPERATION,
    OperationOnGuidance,
    Sharpen,
    TonemapReinhard,
    apply_operation,
    match_latent_shape,
    mix_directions_and_lengths,
    paste_masked,
)
from .diffusion.resize import common_upscale
from .diffusion.sampling_conds import repeat_to_batch

MAX_RESOLUTION = 16384


def _matched(first: torch.Tensor, second: torch.Tensor, input_name: str, repeat_batch: bool = True) -> torch.Tensor:
    """`second` resized to `first` (ComfyUI's reshape_latent_to), or an InputError when the channels differ."""
    if second.shape[1] != first.shape[1]:
        raise InputError(input_name, f"has {second.shape[1]} channels, the first latent {first.shape[1]}")
    return match_latent_shape(first.shape, second, repeat_batch)


def _with_samples(latent: dict, samples: torch.Tensor) -> dict:
    out = dict(latent)
    out["samples"] = samples
    return out


class LatentAdd(Node):
    category = "latent/advanced"
    outputs = (Output(LATENT),)

    samples1: Annotated[Any, Socket(LATENT)]
    samples2: Annotated[Any, Socket(LATENT)]

    def run(self, ctx: RunContext):
        first = self.samples1["samples"]
        return (_with_samples(self.samples1, first + _matched(first, self.samples2["samples"], "samples2")),)


class LatentSubtract(Node):
    category = "latent/advanced"
    outputs = (Output(LATENT),)

    samples1: Annotated[Any, Socket(LATENT)]
    samples2: Annotated[Any, Socket(LATENT)]

    def run(self, ctx: RunContext):
        first = self.samples1["samples"]
        return (_with_samples(self.samples1, first - _matched(first, self.samples2["samples"], "samples2")),)


class LatentMultiply(Node):
    category = "latent/advanced"
    outputs = (Output(LATENT),)

    samples: Annotated[Any, Socket(LATENT)]
    multiplier: Annotated[float, Float(min=-10.0, max=10.0, step=0.01)] = 1.0

    def run(self, ctx: RunContext):
        return (_with_samples(self.samples, self.samples["samples"] * self.multiplier),)


class LatentInterpolate(Node):
    category = "latent/advanced"
    outputs = (Output(LATENT),)

    samples1: Annotated[Any, Socket(LATENT)]
    samples2: Annotated[Any, Socket(LATENT)]
    ratio: Annotated[float, Float(min=0.0, max=1.0, step=0.01)] = 1.0

    def run(self, ctx: RunContext):
        first = self.samples1["samples"]
        second = _matched(first, self.samples2["samples"], "samples2")
        return (_with_samples(self.samples1, mix_directions_and_lengths(first, second, self.ratio)),)


class LatentConcat(Node):
    category = "latent/advanced"
    outputs = (Output(LATENT),)

    samples1: Annotated[Any, Socket(LATENT)]
    samples2: Annotated[Any, Socket(LATENT)]
    dim: Annotated[str, Combo(("x", "-x", "y", "-y", "t", "-t"))] = "x"

    def run(self, ctx: RunContext):
        first = self.samples1["samples"]
        second = repeat_to_batch(self.samples2["samples"], first.shape[0])
        # x, y and t are the last, second-to-last and third-to-last axes: for image latents "t" is the channels.
        axis = {"x": -1, "y": -2, "t": -3}[self.dim.lstrip("-")]
        pair = (second, first) if self.dim.startswith("-") else (first, second)
        kept = [size for index, size in enumerate(first.shape) if index != first.ndim + axis]
        other = [size for index, size in enumerate(second.shape) if index != second.ndim + axis]
        if kept != other:
            raise InputError("samples2", f"shape {tuple(self.samples2['samples'].shape)} cannot be joined to "
                             f"{tuple(first.shape)} "
                             f"along '{self.dim}'")
        return (_with_samples(self.samples1, torch.cat(pair, dim=axis)),)


class LatentCut(Node):
    category = "latent/advanced"
    outputs = (Output(LATENT),)

    samples: Annotated[Any, Socket(LATENT)]
    dim: Annotated[str, Combo(("x", "y", "t"))] = "x"
    index: Annotated[int, Int(min=-MAX_RESOLUTION, max=MAX_RESOLUTION, step=1)] = 0
    amount: Annotated[int, Int(min=1, max=MAX_RESOLUTION, step=1)] = 1

    def run(self, ctx: RunContext):
        samples = self.samples["samples"]
        axis = samples.ndim - {"x": 1, "y": 2, "t": 3}[self.dim]
        size = samples.shape[axis]
        # A start past either end is clamped to the first or last element; the length to what is left.
        if self.index >= 0:
            start = min(self.index, size - 1)
            length = min(size - start, self.amount)
        else:
            start = max(self.index, -size)
            length = min(-start, self.amount)
        return (_with_samples(self.samples, torch.narrow(samples, axis, start, length)),)


class LatentBatch(Node):
    category = "latent/batch"
    outputs = (Output(LATENT),)

    samples1: Annotated[Any, Socket(LATENT)]
    samples2: Annotated[Any, Socket(LATENT)]

    def run(self, ctx: RunContext):
        first = self.samples1["samples"]
        second = _matched(first, self.samples2["samples"], "samples2", repeat_batch=False)
        out = _with_samples(self.samples1, torch.cat((first, second), dim=0))
        # Each item keeps the noise it would have had in its own batch.
        out["batch_index"] = (list(self.samples1.get("batch_index", range(first.shape[0])))
                              + list(self.samples2.get("batch_index", range(second.shape[0]))))
        return (out,)


class LatentBatchSeedBehavior(Node):
    category = "latent/advanced"
    outputs = (Output(LATENT),)

    samples: Annotated[Any, Socket(LATENT)]
    seed_behavior: Annotated[str, Combo(("random", "fixed"))] = "fixed"

    def run(self, ctx: RunContext):
        out = dict(self.samples)
        if self.seed_behavior == "random":
            out.pop("batch_index", None)  # every item gets its own noise again
        else:
            first = (list(out.get("batch_index") or [0]))[0]
            out["batch_index"] = [first] * self.samples["samples"].shape[0]  # every item gets the first's noise
        return (out,)


class LatentCompositeMasked(Node):
    category = "latent"
    outputs = (Output(LATENT),)

    destination: Annotated[Any, Socket(LATENT)]
    source: Annotated[Any, Socket(LATENT)]
    x: Annotated[int, Int(min=0, max=MAX_RESOLUTION, step=8)] = 0
    y: Annotated[int, Int(min=0, max=MAX_RESOLUTION, step=8)] = 0
    resize_source: Annotated[bool, Boolean()] = False
    mask: Annotated[Any, Socket(MASK, optional=True)] = None

    def run(self, ctx: RunContext):
        destination = self.destination["samples"]
        source = self.source["samples"]
        if source.shape[1] != destination.shape[1]:
            raise InputError("source", f"has {source.shape[1]} channels, the destination {destination.shape[1]}")
        result = paste_masked(destination.clone(), source, self.x, self.y, self.mask, 8, self.resize_source)
        return (_with_samples(self.destination, result),)


class LatentCrop(Node):
    display_name = "Crop Latent"
    category = "latent/transform"
    outputs = (Output(LATENT),)

    samples: Annotated[Any, Socket(LATENT)]
    width: Annotated[int, Int(min=64, max=MAX_RESOLUTION, step=8)] = 512
    height: Annotated[int, Int(min=64, max=MAX_RESOLUTION, step=8)] = 512
    x: Annotated[int, Int(min=0, max=MAX_RESOLUTION, step=8)] = 0
    y: Annotated[int, Int(min=0, max=MAX_RESOLUTION, step=8)] = 0

    def run(self, ctx: RunContext):
        samples = self.samples["samples"]
        # The corner is kept at least 8 latent pixels (64 image pixels) inside the latent.
        x = min(self.x // 8, samples.shape[3] - 8)
        y = min(self.y // 8, samples.shape[2] - 8)
        cropped = samples[:, :, y:y + self.height // 8, x:x + self.width // 8]
        if cropped.shape[2] == 0 or cropped.shape[3] == 0:
            raise InputError("samples", f"a {samples.shape[3] * 8}x{samples.shape[2] * 8} latent is too small to "
                             "crop (the crop keeps at least 64 pixels)")
        return (_with_samples(self.samples, cropped),)


class LatentFlip(Node):
    display_name = "Flip Latent"
    category = "latent/transform"
    outputs = (Output(LATENT),)

    samples: Annotated[Any, Socket(LATENT)]
    flip_method: Annotated[str, Combo(("x-axis: vertically", "y-axis: horizontally"))] = "x-axis: vertically"

    def run(self, ctx: RunContext):
        axis = 2 if self.flip_method.startswith("x") else 3
        return (_with_samples(self.samples, torch.flip(self.samples["samples"], dims=[axis])),)


class LatentRotate(Node):
    display_name = "Rotate Latent"
    category = "latent/transform"
    outputs = (Output(LATENT),)

    samples: Annotated[Any, Socket(LATENT)]
    rotation: Annotated[str, Combo(("none", "90 degrees", "180 degrees", "270 degrees"))] = "none"

    def run(self, ctx: RunContext):
        quarter_turns = {"none": 0, "90 degrees": 1, "180 degrees": 2, "270 degrees": 3}[self.rotation]
        # dims (width, height): clockwise, as the image would turn.
        return (_with_samples(self.samples, torch.rot90(self.samples["samples"], k=quarter_turns, dims=[3, 2])),)


class LatentBlend(Node):
    display_name = "Latent Blend"
    category = "_for_testing"
    outputs = (Output(LATENT),)

    samples1: Annotated[Any, Socket(LATENT)]
    samples2: Annotated[Any, Socket(LATENT)]
    blend_factor: Annotated[float, Float(min=0, max=1, step=0.01)] = 0.5

    def run(self, ctx: RunContext):
        first = self.samples1["samples"]
        second = self.samples2["samples"]
        if second.shape != first.shape:
            # Only height and width are matched (bicubic, centre crop); the batches must agree or one be 1.
            second = common_upscale(second, first.shape[3], first.shape[2], "bicubic", "center")
        try:
            torch.broadcast_shapes(first.shape, second.shape)
        except RuntimeError:
            raise InputError("samples2", f"shape {tuple(self.samples2['samples'].shape)} cannot be blended with "
                             f"{tuple(first.shape)}") from None
        # The "normal" mode: the blend of samples2 is samples2 itself.
        return (_with_samples(self.samples1, first * self.blend_factor + second * (1 - self.blend_factor)),)


def _parts_of(latent: dict, offset: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """(samples, one noise mask per item at image resolution, batch indices) of one latent of the list."""
    samples = latent["samples"]
    batch, height, width = samples.shape[0], samples.shape[-2] * 8, samples.shape[-1] * 8
    masks = latent.get("noise_mask")
    if masks is None:
        masks = torch.ones((batch, 1, height, width), device=samples.device)
    else:
        masks = masks.to(samples.device).reshape(-1, 1, masks.shape[-2], masks.shape[-1])
        if masks.shape[-2:] != (height, width):
            # ComfyUI means to resize here but drops the result; masks of one size are what can be joined.
            masks = torch.nn.functional.interpolate(masks.float(), size=(height, width), mode="bilinear")
        masks = repeat_to_batch(masks, batch)  # one per item (ComfyUI cycles short batches, keeps long ones)
    indices = list(latent.get("batch_index", range(offset, offset + batch)))
    return samples, masks, indices


def rebatch(latents: list[dict], batch_size: int) -> list[dict]:
    """RebatchLatents: runs of consecutive latents of one size are joined and cut into batches of `batch_size`
    (the last of each run may be smaller). Items without a batch_index get their position in the whole list;
    noise masks that are all ones are dropped, as ComfyUI does."""
    runs: list[list[tuple[torch.Tensor, torch.Tensor, list[int]]]] = []
    offset = 0
    for latent in latents:
        parts = _parts_of(latent, offset)
        offset += len(parts[2])
        if runs and runs[-1][0][0].shape[-2:] == parts[0].shape[-2:]:
            if runs[-1][0][0].shape[1:] != parts[0].shape[1:]:
                raise InputError("latents", f"latents of one size must have the same channels to be batched "
                                 f"(got {tuple(runs[-1][0][0].shape)} and {tuple(parts[0].shape)})")
            runs[-1].append(parts)
        else:
            runs.append([parts])
    batches = []
    for run in runs:
        samples = torch.cat([parts[0] for parts in run])
        masks = torch.cat([parts[1] for parts in run])
        indices = [index for parts in run for index in parts[2]]
        for start in range(0, samples.shape[0], batch_size):
            batch: dict[str, Any] = {"samples": samples[start:start + batch_size],
                                     "batch_index": indices[start:start + batch_size]}
            batch_masks = masks[start:start + batch_size]
            if batch_masks.mean() != 1.0:
                batch["noise_mask"] = batch_masks
            batches.append(batch)
    return batches


class RebatchLatents(Node):
    display_name = "Rebatch Latents"
    category = "latent/batch"
    input_is_list = True
    outputs = (Output(LATENT, is_list=True),)

    # Whole lists arrive (input_is_list): every latent of the list, and the batch size as a one-item list.
    latents: Annotated[Any, Socket(LATENT)]
    batch_size: Annotated[Any, Int(min=1, max=4096)] = 1

    def run(self, ctx: RunContext):
        return (rebatch(list(self.latents), int(self.batch_size[0])),)


class LatentApplyOperation(Node):
    category = "latent/advanced/operations"
    experimental = True
    outputs = (Output(LATENT),)

    samples: Annotated[Any, Socket(LATENT)]
    operation: Annotated[Any, Socket(LATENT_OPERATION)]

    def run(self, ctx: RunContext):
        try:
            result = apply_operation(self.operation, self.samples["samples"])
        except ValueError as error:
            raise InputError("operation", str(error)) from None
        return (_with_samples(self.samples, result),)


class LatentApplyOperationCFG(Node):
    category = "latent/advanced/operations"
    experimental = True
    outputs = (Output(MODEL),)

    model: Annotated[Any, Socket(MODEL)]
    operation: Annotated[Any, Socket(LATENT_OPERATION)]

    def run(self, ctx: RunContext):
        return (self.model.add_sampler_pre_cfg_function(OperationOnGuidance(self.operation)),)


class LatentOperationTonemapReinhard(Node):
    category = "latent/advanced/operations"
    experimental = True
    outputs = (Output(LATENT_OPERATION),)

    multiplier: Annotated[float, Float(min=0.0, max=100.0, step=0.01)] = 1.0

    def run(self, ctx: RunContext):
        return (TonemapReinhard(self.multiplier),)


class LatentOperationSharpen(Node):
    category = "latent/advanced/operations"
    experimental = True
    outputs = (Output(LATENT_OPERATION),)

    sharpen_radius: Annotated[int, Int(min=1, max=31, step=1)] = 9
    sigma: Annotated[float, Float(min=0.1, max=10.0, step=0.1)] = 1.0
    alpha: Annotated[float, Float(min=0.0, max=5.0, step=0.01)] = 0.1

    def run(self, ctx: RunContext):
        return (Sharpen(self.sharpen_radius, self.sigma, self.alpha),)


NODES = [LatentAdd, LatentSubtract, LatentMultiply, LatentInterpolate, LatentConcat, LatentCut, LatentBatch,
         LatentBatchSeedBehavior, LatentCompositeMasked, LatentCrop, LatentFlip, LatentRotate, LatentBlend,
         RebatchLatents, LatentApplyOperation, LatentApplyOperationCFG,
         LatentOperationTonemapReinhard, LatentOperationSharpen]
