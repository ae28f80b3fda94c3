"""Mask nodes and alpha compositing (ComfyUI's comfy_extras/nodes_mask.py and nodes_compositing.py: names,
signatures and numerics).

MASK = float [B,H,W] (also accepted as [H,W] or [B,1,H,W]), 1 = masked; IMAGE = float [B,H,W,C] in 0..1. An
IMAGE's alpha channel is opacity, a MASK is its complement (1 - alpha).
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Annotated, Any

import torch
import torch.nn.functional as F

from latentloom.engine.inputs import InputError
from latentloom.engine.node import Node, NodeOutput, RunContext
from latentloom.engine.types import IMAGE, MASK, Boolean, Combo, Float, Int, Output, Socket

from .image_files import png_metadata, save_images
from .imaging import (
    PORTER_DUFF_MODES,
    composite,
    feather,
    grow,
    mask_batch,
    match_alpha,
    porter_duff,
    resize_like,
)

MAX_RESOLUTION = 16384
IMAGE_CHANNELS = ("red", "green", "blue", "alpha")
MASK_OPERATIONS = ("multiply", "add", "subtract", "and", "or", "xor")
# ComfyUI's alphabet for temp preview name suffixes (its 'p' stands where 'q' would).
PREVIEW_LETTERS = "abcdefghijklmnopqrstupvxyz"

Position = Annotated[int, Int(min=0, max=MAX_RESOLUTION, step=1)]
Size = Annotated[int, Int(min=1, max=MAX_RESOLUTION, step=1)]
Edge = Annotated[int, Int(min=0, max=MAX_RESOLUTION, step=1)]


def mask_to_image(mask: torch.Tensor) -> torch.Tensor:
    """A MASK as a grey IMAGE [B,H,W,3] (a view, not a copy)."""
    return mask_batch(mask).unsqueeze(-1).expand(-1, -1, -1, 3)


class ImageCompositeMasked(Node):
    category = "image"
    outputs = (Output(IMAGE),)

    destination: Annotated[Any, Socket(IMAGE)]
    source: Annotated[Any, Socket(IMAGE)]
    x: Position = 0
    y: Position = 0
    resize_source: Annotated[bool, Boolean()] = False
    mask: Annotated[Any, Socket(MASK, optional=True)] = None

    def run(self, ctx: RunContext):
        destination, source = match_alpha(self.destination, self.source)
        pasted = composite(destination.movedim(-1, 1), source.movedim(-1, 1), self.x, self.y, self.mask, 1,
                           self.resize_source)
        return (pasted.movedim(1, -1),)


class MaskToImage(Node):
    display_name = "Convert Mask to Image"
    category = "mask"
    outputs = (Output(IMAGE),)

    mask: Annotated[Any, Socket(MASK)]

    def run(self, ctx: RunContext):
        return (mask_to_image(self.mask),)


class ImageToMask(Node):
    display_name = "Convert Image to Mask"
    category = "mask"
    outputs = (Output(MASK),)

    image: Annotated[Any, Socket(IMAGE)]
    channel: Annotated[str, Combo(IMAGE_CHANNELS)] = "red"

    def run(self, ctx: RunContext):
        index = IMAGE_CHANNELS.index(self.channel)
        if index >= self.image.shape[-1]:
            raise InputError("channel", f"the image has no {self.channel} channel ({self.image.shape[-1]} channels)")
        return (self.image[..., index],)


class ImageColorToMask(Node):
    category = "mask"
    outputs = (Output(MASK),)

    image: Annotated[Any, Socket(IMAGE)]
    color: Annotated[int, Int(min=0, max=0xFFFFFF, step=1, display="color")] = 0

    def run(self, ctx: RunContext):
        if self.image.shape[-1] < 3:
            raise InputError("image", f"must have red, green and blue channels (got {self.image.shape[-1]})")
        # Each channel rounded to 0..255 and packed as 0xRRGGBB; exact matches only.
        levels = (torch.clamp(self.image[..., :3], 0, 1.0) * 255.0).round().to(torch.int64)
        packed = (levels[..., 0] << 16) + (levels[..., 1] << 8) + levels[..., 2]
        return ((packed == self.color).float(),)


class SolidMask(Node):
    category = "mask"
    outputs = (Output(MASK),)

    value: Annotated[float, Float(min=0.0, max=1.0, step=0.01)] = 1.0
    width: Size = 512
    height: Size = 512

    def run(self, ctx: RunContext):
        return (torch.full((1, self.height, self.width), self.value, dtype=torch.float32),)


class InvertMask(Node):
    category = "mask"
    outputs = (Output(MASK),)

    mask: Annotated[Any, Socket(MASK)]

    def run(self, ctx: RunContext):
        return (1.0 - self.mask,)


class CropMask(Node):
    category = "mask"
    outputs = (Output(MASK),)

    mask: Annotated[Any, Socket(MASK)]
    x: Position = 0
    y: Position = 0
    width: Size = 512
    height: Size = 512

    def run(self, ctx: RunContext):
        mask = mask_batch(self.mask)
        if self.x >= mask.shape[-1]:
            raise InputError("x", f"{self.x} is outside the mask (width {mask.shape[-1]})")
        if self.y >= mask.shape[-2]:
            raise InputError("y", f"{self.y} is outside the mask (height {mask.shape[-2]})")
        return (mask[:, self.y:self.y + self.height, self.x:self.x + self.width],)


class MaskComposite(Node):
    category = "mask"
    outputs = (Output(MASK),)

    destination: Annotated[Any, Socket(MASK)]
    source: Annotated[Any, Socket(MASK)]
    x: Position = 0
    y: Position = 0
    operation: Annotated[str, Combo(MASK_OPERATIONS)] = "multiply"

    def run(self, ctx: RunContext):
        output = mask_batch(self.destination).clone()
        source = mask_batch(self.source)
        # The source batch must broadcast onto the destination's (one mask, or one per destination mask).
        if source.shape[0] not in (1, output.shape[0]):
            raise InputError("source", f"has {source.shape[0]} masks; the destination has {output.shape[0]} "
                                       "(give one source mask, or as many as the destination)")
        left, top = self.x, self.y
        right = min(left + source.shape[-1], output.shape[-1])
        bottom = min(top + source.shape[-2], output.shape[-2])
        if right > left and bottom > top:
            overlap = source[:, :bottom - top, :right - left]
            region = output[:, top:bottom, left:right]
            output[:, top:bottom, left:right] = self.combine(region, overlap)
        return (torch.clamp(output, 0.0, 1.0),)

    def combine(self, region: torch.Tensor, overlap: torch.Tensor) -> torch.Tensor:
        if self.operation == "multiply":
            return region * overlap
        if self.operation == "add":
            return region + overlap
        if self.operation == "subtract":
            return region - overlap
        # The logical operations see each value rounded to 0 or 1.
        region_set, overlap_set = region.round().bool(), overlap.round().bool()
        if self.operation == "and":
            return (region_set & overlap_set).float()
        if self.operation == "or":
            return (region_set | overlap_set).float()
        return (region_set ^ overlap_set).float()


class FeatherMask(Node):
    category = "mask"
    outputs = (Output(MASK),)

    mask: Annotated[Any, Socket(MASK)]
    left: Edge = 0
    top: Edge = 0
    right: Edge = 0
    bottom: Edge = 0

    def run(self, ctx: RunContext):
        return (feather(mask_batch(self.mask), self.left, self.top, self.right, self.bottom),)


class GrowMask(Node):
    category = "mask"
    outputs = (Output(MASK),)

    mask: Annotated[Any, Socket(MASK)]
    expand: Annotated[int, Int(min=-MAX_RESOLUTION, max=MAX_RESOLUTION, step=1)] = 0
    tapered_corners: Annotated[bool, Boolean()] = True

    def run(self, ctx: RunContext):
        return (grow(mask_batch(self.mask), self.expand, self.tapered_corners),)


class ThresholdMask(Node):
    category = "mask"
    outputs = (Output(MASK),)

    mask: Annotated[Any, Socket(MASK)]
    value: Annotated[float, Float(min=0.0, max=1.0, step=0.01)] = 0.5

    def run(self, ctx: RunContext):
        return ((self.mask > self.value).float(),)


class MaskPreview(Node):
    category = "mask"
    output_node = True

    mask: Annotated[Any, Socket(MASK)]

    def run(self, ctx: RunContext):
        suffix = "".join(secrets.choice(PREVIEW_LETTERS) for _ in range(5))
        metadata = None
        if not getattr(ctx.env, "disable_metadata", False):
            extra = (ctx.extra_data or {}).get("extra_pnginfo")
            metadata = png_metadata(ctx.prompt, extra if isinstance(extra, dict) else None)
        # Saved like PreviewImage, but at PNG compression level 4 as ComfyUI's MaskPreview does.
        results = save_images(mask_to_image(self.mask), Path(ctx.env.temp_dir), f"ComfyUI_temp_{suffix}", "temp", 4,
                              metadata)
        return NodeOutput(ui={"images": results})


# Alpha compositing (comfy_extras/nodes_compositing.py) ------------------------------------------------------------


class PorterDuffImageComposite(Node):
    display_name = "Porter-Duff Image Composite"
    category = "mask/compositing"
    outputs = (Output(IMAGE), Output(MASK))

    source: Annotated[Any, Socket(IMAGE)]
    source_alpha: Annotated[Any, Socket(MASK)]
    destination: Annotated[Any, Socket(IMAGE)]
    destination_alpha: Annotated[Any, Socket(MASK)]
    mode: Annotated[str, Combo(PORTER_DUFF_MODES)] = "DST"

    def run(self, ctx: RunContext):
        source_alpha, destination_alpha = mask_batch(self.source_alpha), mask_batch(self.destination_alpha)
        if self.source.shape[-1] != self.destination.shape[-1]:
            raise InputError("source", f"has {self.source.shape[-1]} channels, the destination "
                                       f"{self.destination.shape[-1]}")
        # Pairs up to the shortest of the four batches; everything is fitted to the destination image's size.
        count = min(len(self.source), len(source_alpha), len(self.destination), len(destination_alpha))
        images, masks = [], []
        for index in range(count):
            source, destination = self.source[index], self.destination[index]
            src_mask, dst_mask = source_alpha[index].unsqueeze(-1), destination_alpha[index].unsqueeze(-1)
            height, width = destination.shape[0], destination.shape[1]
            if dst_mask.shape[:2] != destination.shape[:2]:
                dst_mask = resize_like(dst_mask, height, width)
            if source.shape != destination.shape:
                source = resize_like(source, height, width)
            if src_mask.shape != dst_mask.shape:
                src_mask = resize_like(src_mask, dst_mask.shape[0], dst_mask.shape[1])
            image, mask = porter_duff(source, src_mask, destination, dst_mask, self.mode)
            images.append(image)
            masks.append(mask.squeeze(-1))
        return (torch.stack(images), torch.stack(masks))


class SplitImageWithAlpha(Node):
    display_name = "Split Image with Alpha"
    category = "mask/compositing"
    outputs = (Output(IMAGE), Output(MASK))

    image: Annotated[Any, Socket(IMAGE)]

    def run(self, ctx: RunContext):
        image = self.image
        alpha = image[..., 3] if image.shape[-1] > 3 else torch.ones_like(image[..., 0])
        return (image[..., :3], 1.0 - alpha)


class JoinImageWithAlpha(Node):
    display_name = "Join Image with Alpha"
    category = "mask/compositing"
    outputs = (Output(IMAGE),)

    image: Annotated[Any, Socket(IMAGE)]
    alpha: Annotated[Any, Socket(MASK)]

    def run(self, ctx: RunContext):
        image = self.image
        # The mask is resized bilinearly to the image and paired up to the shorter of the two batches.
        masks = mask_batch(self.alpha).unsqueeze(1)
        alpha = 1.0 - F.interpolate(masks, size=image.shape[1:3], mode="bilinear").squeeze(1)
        count = min(len(image), len(alpha))
        return (torch.cat((image[:count, ..., :3], alpha[:count].unsqueeze(-1).to(image.dtype)), dim=-1),)


NODES = [ImageCompositeMasked, MaskToImage, ImageToMask, ImageColorToMask, SolidMask, InvertMask, CropMask,
         MaskComposite, FeatherMask, GrowMask, ThresholdMask, MaskPreview, PorterDuffImageComposite,
         SplitImageWithAlpha, JoinImageWithAlpha]
