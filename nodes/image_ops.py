"""Image operations (ComfyUI's comfy_extras nodes_post_processing, nodes_morphology, nodes_images, nodes_rebatch,
nodes_webcam and LoadImageOutput from nodes.py: names, signatures and numerics).

IMAGE = float [B,H,W,C] in 0..1.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

import numpy as np
import torch
from PIL import Image

from latentloom.engine.environment import Environment
from latentloom.engine.inputs import InputError
from latentloom.engine.node import Node, NodeOutput, RunContext
from latentloom.engine.types import COMBO, IMAGE, INT, Boolean, Combo, Float, InputSpec, Int, Output, Socket

from .diffusion.resize import common_upscale
from .image import LoadImage
from .imaging import bayer_matrix, filter_reflect, gaussian_kernel, match_alpha, spacing_fill

MAX_RESOLUTION = 16384
MAX_SEED = 0xFFFFFFFFFFFFFFFF
BLEND_MODES = ("normal", "multiply", "screen", "overlay", "soft_light", "difference")
DITHER_METHODS = ("none", "floyd-steinberg", "bayer-2", "bayer-4", "bayer-8", "bayer-16")
MORPHOLOGY_OPERATIONS = ("erode", "dilate", "open", "close", "gradient", "bottom_hat", "top_hat")
FLIP_METHODS = ("x-axis: vertically", "y-axis: horizontally")
ROTATIONS = ("none", "90 degrees", "180 degrees", "270 degrees")
STITCH_DIRECTIONS = ("right", "down", "left", "up")
SPACING_COLORS = ("white", "black", "red", "green", "blue")
# ComfyUI lists "bilinear" twice in this combo; the duplicate is part of its signature.
MAX_DIMENSION_METHODS = ("area", "lanczos", "bilinear", "nearest-exact", "bilinear", "bicubic")
PAD_INTERPOLATIONS = ("area", "bicubic", "nearest-exact", "bilinear", "lanczos")


def _resize(image: torch.Tensor, width: int, height: int, method: str, input_name: str) -> torch.Tensor:
    """IMAGE resized with one of ComfyUI's upscale methods; an empty target size is the named input's fault."""
    if width < 1 or height < 1:
        raise InputError(input_name, f"gives an empty {width}x{height} image")
    return common_upscale(image.movedim(-1, 1), width, height, method, "disabled").movedim(1, -1)


def _check_filter_radius(image: torch.Tensor, radius: int, input_name: str) -> None:
    # The borders are mirrored, which needs the image to be larger than the radius.
    if radius >= min(image.shape[1], image.shape[2]):
        raise InputError(input_name, f"{radius} must be smaller than the image's height and width "
                                     f"({image.shape[1]}x{image.shape[2]})")


# Post-processing (comfy_extras/nodes_post_processing.py) ----------------------------------------------------------


def blend(base: torch.Tensor, layer: torch.Tensor, mode: str) -> torch.Tensor:
    """The blend-mode result of `layer` over `base` (both 0..1), before mixing with blend_factor."""
    if mode == "normal":
        return layer
    if mode == "multiply":
        return base * layer
    if mode == "screen":
        return 1 - (1 - base) * (1 - layer)
    if mode == "overlay":
        return torch.where(base <= 0.5, 2 * base * layer, 1 - 2 * (1 - base) * (1 - layer))
    if mode == "soft_light":
        # The W3C soft-light formula: D(x) is a cubic below 0.25, sqrt(x) above.
        curve = torch.where(base <= 0.25, ((16 * base - 12) * base + 4) * base, torch.sqrt(base))
        return torch.where(layer <= 0.5, base - (1 - 2 * layer) * base * (1 - base),
                           base + (2 * layer - 1) * (curve - base))
    if mode == "difference":
        return base - layer
    raise ValueError(f"unknown blend mode '{mode}'")


class ImageBlend(Node):
    category = "image/postprocessing"
    outputs = (Output(IMAGE),)

    image1: Annotated[Any, Socket(IMAGE)]
    image2: Annotated[Any, Socket(IMAGE)]
    blend_factor: Annotated[float, Float(min=0.0, max=1.0, step=0.01)] = 0.5
    blend_mode: Annotated[str, Combo(BLEND_MODES)] = "normal"

    def run(self, ctx: RunContext):
        base, layer = match_alpha(self.image1, self.image2)
        layer = layer.to(base.device)
        if base.shape != layer.shape:
            # image2 is fitted to image1's size (centre crop, bicubic).
            layer = common_upscale(layer.permute(0, 3, 1, 2), base.shape[2], base.shape[1], "bicubic",
                                   "center").permute(0, 2, 3, 1)
        if base.shape[0] != layer.shape[0] and 1 not in (base.shape[0], layer.shape[0]):
            # The batches broadcast: equal, or one image blended with every image of the other batch.
            raise InputError("image2", f"has {layer.shape[0]} images and image1 {base.shape[0]}: give the same "
                                       "number, or one image on either side")
        mixed = base * (1 - self.blend_factor) + blend(base, layer, self.blend_mode) * self.blend_factor
        return (torch.clamp(mixed, 0, 1),)


class ImageBlur(Node):
    category = "image/postprocessing"
    outputs = (Output(IMAGE),)

    image: Annotated[Any, Socket(IMAGE)]
    blur_radius: Annotated[int, Int(min=1, max=31, step=1)] = 1
    sigma: Annotated[float, Float(min=0.1, max=10.0, step=0.1)] = 1.0

    def run(self, ctx: RunContext):
        _check_filter_radius(self.image, self.blur_radius, "blur_radius")
        kernel = gaussian_kernel(self.blur_radius * 2 + 1, self.sigma, device=self.image.device)
        return (filter_reflect(self.image, kernel),)


class ImageSharpen(Node):
    category = "image/postprocessing"
    outputs = (Output(IMAGE),)

    image: Annotated[Any, Socket(IMAGE)]
    sharpen_radius: Annotated[int, Int(min=1, max=31, step=1)] = 1
    sigma: Annotated[float, Float(min=0.1, max=10.0, step=0.01)] = 1.0
    alpha: Annotated[float, Float(min=0.0, max=5.0, step=0.01)] = 1.0

    def run(self, ctx: RunContext):
        _check_filter_radius(self.image, self.sharpen_radius, "sharpen_radius")
        size = self.sharpen_radius * 2 + 1
        # Unsharp masking in one kernel: -10·alpha·Gaussian, with the centre raised so the weights sum to 1.
        kernel = gaussian_kernel(size, self.sigma, self.image.dtype, self.image.device) * -(self.alpha * 10)
        centre = size // 2
        kernel[centre, centre] = kernel[centre, centre] - kernel.sum() + 1.0
        return (torch.clamp(filter_reflect(self.image, kernel), 0, 1),)


def _ordered_dither(pixels: Image.Image, palette: Image.Image, order: int) -> Image.Image:
    """Add a tiled Bayer threshold (spread over one palette step) to the pixels, then map to the palette."""
    colours = len(palette.getpalette() or []) // 3
    spread = 2 * 256 / max(colours, 1)
    thresholds = torch.from_numpy(spread * bayer_matrix(order) + 0.5)
    values = torch.from_numpy(np.array(pixels).astype(np.float32))
    tiles = (math.ceil(values.shape[0] / order), math.ceil(values.shape[1] / order))
    tiled = thresholds.tile(tiles).unsqueeze(-1)[:values.shape[0], :values.shape[1]]
    shifted = (values + tiled).clamp(0, 255).to(torch.uint8)
    return Image.fromarray(shifted.numpy()).quantize(palette=palette, dither=Image.Dither.NONE)


class ImageQuantize(Node):
    category = "image/postprocessing"
    outputs = (Output(IMAGE),)

    image: Annotated[Any, Socket(IMAGE)]
    colors: Annotated[int, Int(min=1, max=256, step=1)] = 256
    dither: Annotated[str, Combo(DITHER_METHODS)] = "none"

    def run(self, ctx: RunContext):
        image = self.image
        if image.shape[-1] < 3:
            raise InputError("image", f"must have red, green and blue channels (got {image.shape[-1]})")
        result = image.clone()  # channels past RGB (alpha) pass through
        for index in range(image.shape[0]):
            # 8-bit by truncation, a palette from PIL's median cut, then the pixels mapped onto it.
            levels = (image[index, ..., :3].clamp(0, 1) * 255).to(torch.uint8).cpu().numpy()
            pixels = Image.fromarray(levels)
            palette = pixels.quantize(colors=self.colors)
            if self.dither == "none":
                quantized = pixels.quantize(palette=palette, dither=Image.Dither.NONE)
            elif self.dither == "floyd-steinberg":
                quantized = pixels.quantize(palette=palette, dither=Image.Dither.FLOYDSTEINBERG)
            else:
                quantized = _ordered_dither(pixels, palette, int(self.dither.split("-")[-1]))
            rgb = torch.from_numpy(np.array(quantized.convert("RGB"))).float() / 255
            result[index, ..., :3] = rgb.to(result.device, result.dtype)
        return (result,)


# Morphology and colour spaces (comfy_extras/nodes_morphology.py): kornia, as ComfyUI ------------------------------


class Morphology(Node):
    display_name = "ImageMorphology"
    category = "image/postprocessing"
    outputs = (Output(IMAGE),)

    image: Annotated[Any, Socket(IMAGE)]
    operation: Annotated[str, Combo(MORPHOLOGY_OPERATIONS)] = "erode"
    kernel_size: Annotated[int, Int(min=3, max=999, step=1)] = 3

    def run(self, ctx: RunContext):
        from kornia import morphology

        operations = {"erode": morphology.erosion, "dilate": morphology.dilation, "open": morphology.opening,
                      "close": morphology.closing, "gradient": morphology.gradient, "top_hat": morphology.top_hat,
                      "bottom_hat": morphology.bottom_hat}
        planes = self.image.movedim(-1, 1)
        # A flat square structuring element; pixels outside the image are ignored (kornia's geodesic border).
        kernel = torch.ones(self.kernel_size, self.kernel_size, dtype=planes.dtype, device=planes.device)
        with torch.no_grad():
            return (operations[self.operation](planes, kernel).movedim(1, -1),)


class ImageRGBToYUV(Node):
    category = "image/batch"
    outputs = (Output(IMAGE, name="Y"), Output(IMAGE, name="U"), Output(IMAGE, name="V"))

    image: Annotated[Any, Socket(IMAGE)]

    def run(self, ctx: RunContext):
        from kornia.color import rgb_to_ycbcr

        image = self.image
        if image.shape[-1] != 3:
            raise InputError("image", f"must have 3 channels (got {image.shape[-1]})")
        # Y, Cb, Cr (BT.601, chroma centred on 0.5), each as a grey 3-channel image.
        planes = rgb_to_ycbcr(image.movedim(-1, 1)).movedim(1, -1)
        return tuple(planes[..., index:index + 1].expand_as(image) for index in range(3))


class ImageYUVToRGB(Node):
    category = "image/batch"
    outputs = (Output(IMAGE),)

    Y: Annotated[Any, Socket(IMAGE)]
    U: Annotated[Any, Socket(IMAGE)]
    V: Annotated[Any, Socket(IMAGE)]

    def run(self, ctx: RunContext):
        from kornia.color import ycbcr_to_rgb

        if not self.Y.shape[:3] == self.U.shape[:3] == self.V.shape[:3]:
            raise InputError("U", f"Y, U and V must have one size and batch (got {tuple(self.Y.shape[:3])}, "
                                  f"{tuple(self.U.shape[:3])}, {tuple(self.V.shape[:3])})")
        # Each plane is the mean of its image's channels.
        planes = torch.cat([plane.mean(dim=-1, keepdim=True) for plane in (self.Y, self.U, self.V)], dim=-1)
        return (ycbcr_to_rgb(planes.movedim(-1, 1)).movedim(1, -1),)


# Transforms and batches (comfy_extras/nodes_images.py, nodes_rebatch.py) -------------------------------------------


class ImageFlip(Node):
    category = "image/transform"
    outputs = (Output(IMAGE),)

    image: Annotated[Any, Socket(IMAGE)]
    flip_method: Annotated[str, Combo(FLIP_METHODS)] = "x-axis: vertically"

    def run(self, ctx: RunContext):
        # Flipping about the x axis turns the image upside down; about the y axis, left to right.
        return (torch.flip(self.image, dims=[1] if self.flip_method.startswith("x") else [2]),)


class ImageRotate(Node):
    category = "image/transform"
    outputs = (Output(IMAGE),)

    image: Annotated[Any, Socket(IMAGE)]
    rotation: Annotated[str, Combo(ROTATIONS)] = "none"

    def run(self, ctx: RunContext):
        quarter_turns = ROTATIONS.index(self.rotation)
        # Clockwise: from the width axis towards the height axis.
        return (torch.rot90(self.image, k=quarter_turns, dims=[2, 1]),)


def _pad_centred(image: torch.Tensor, dim: int, size: int, value: float) -> torch.Tensor:
    """Pad the height (dim 1) or width (dim 2) of an IMAGE to `size`, the extra split floor / ceil."""
    missing = size - image.shape[dim]
    if missing <= 0:
        return image
    before, after = missing // 2, missing - missing // 2
    padding = (0, 0, 0, 0, before, after) if dim == 1 else (0, 0, before, after)
    return torch.nn.functional.pad(image, padding, mode="constant", value=value)


class ImageStitch(Node):
    display_name = "Image Stitch"
    category = "image/transform"
    description = ("Stitches image2 to image1 in the specified direction. If image2 is not provided, returns image1 "
                   "unchanged. Optional spacing can be added between images.")
    outputs = (Output(IMAGE),)

    image1: Annotated[Any, Socket(IMAGE)]
    direction: Annotated[str, Combo(STITCH_DIRECTIONS)] = "right"
    match_image_size: Annotated[bool, Boolean()] = True
    spacing_width: Annotated[int, Int(min=0, max=1024, step=2)] = 0
    spacing_color: Annotated[str, Combo(SPACING_COLORS)] = "white"
    image2: Annotated[Any, Socket(IMAGE, optional=True)] = None

    def run(self, ctx: RunContext):
        first, second = self.image1, self.image2
        if second is None:
            return (first,)
        horizontal = self.direction in ("left", "right")
        # The shorter batch repeats its last image.
        batch = max(first.shape[0], second.shape[0])
        first = torch.cat([first, first[-1:].repeat(batch - first.shape[0], 1, 1, 1)])
        second = torch.cat([second, second[-1:].repeat(batch - second.shape[0], 1, 1, 1)])
        if self.match_image_size:
            # image2 keeps its aspect ratio and takes image1's height (side by side) or width (stacked), Lanczos.
            aspect = second.shape[2] / second.shape[1]
            if horizontal:
                width, height = int(first.shape[1] * aspect), first.shape[1]
            else:
                width, height = first.shape[2], int(first.shape[2] / aspect)
            second = _resize(second, width, height, "lanczos", "image2")
        else:
            # The other dimension is padded to match, centred, in the spacing colour (black for red/green/blue).
            value = 1.0 if self.spacing_color == "white" else 0.0
            dim = 1 if horizontal else 2
            size = max(first.shape[dim], second.shape[dim])
            first, second = _pad_centred(first, dim, size, value), _pad_centred(second, dim, size, value)
        channels = max(first.shape[-1], second.shape[-1])
        first, second = (torch.nn.functional.pad(part, (0, channels - part.shape[-1]), value=1.0)
                         for part in (first, second))
        parts = [second, first] if self.direction in ("left", "up") else [first, second]
        if self.spacing_width > 0:
            spacing_width = self.spacing_width + self.spacing_width % 2
            if horizontal:
                shape = (batch, max(first.shape[1], second.shape[1]), spacing_width, channels)
            else:
                shape = (batch, spacing_width, max(first.shape[2], second.shape[2]), channels)
            fill = torch.tensor(spacing_fill(self.spacing_color, channels), dtype=first.dtype, device=first.device)
            parts.insert(1, fill.expand(shape))
        try:
            return (torch.cat(parts, dim=2 if horizontal else 1),)
        except RuntimeError:
            raise InputError("image2", f"cannot be stitched {self.direction} of image1: sizes "
                                       f"{tuple(first.shape[1:3])} and {tuple(second.shape[1:3])}") from None


class ImageFromBatch(Node):
    category = "image/batch"
    outputs = (Output(IMAGE),)

    image: Annotated[Any, Socket(IMAGE)]
    batch_index: Annotated[int, Int(min=0, max=4095)] = 0
    length: Annotated[int, Int(min=1, max=4096)] = 1

    def run(self, ctx: RunContext):
        count = self.image.shape[0]
        start = min(count - 1, self.batch_index)
        length = min(count - start, self.length)
        return (self.image[start:start + length].clone(),)


class RebatchImages(Node):
    display_name = "Rebatch Images"
    category = "image/batch"
    input_is_list = True
    outputs = (Output(IMAGE, is_list=True),)

    images: Annotated[Any, Socket(IMAGE)]
    batch_size: Annotated[Any, Int(min=1, max=4096)] = 1  # a list, as every input of an input_is_list node

    def run(self, ctx: RunContext):
        size = self.batch_size[0]
        singles = [image[index:index + 1] for image in self.images for index in range(image.shape[0])]
        try:
            return ([torch.cat(singles[start:start + size]) for start in range(0, len(singles), size)],)
        except RuntimeError:
            raise InputError("images", "images batched together must have one size and channel count") from None


class RepeatImageBatch(Node):
    category = "image/batch"
    outputs = (Output(IMAGE),)

    image: Annotated[Any, Socket(IMAGE)]
    amount: Annotated[int, Int(min=1, max=4096)] = 1

    def run(self, ctx: RunContext):
        return (self.image.repeat((self.amount, 1, 1, 1)),)


class ImageAddNoise(Node):
    category = "image"
    outputs = (Output(IMAGE),)

    image: Annotated[Any, Socket(IMAGE)]
    seed: Annotated[int, Int(min=0, max=MAX_SEED, control_after_generate=True,
                             tooltip="The random seed used for creating the noise.")] = 0
    strength: Annotated[float, Float(min=0.0, max=1.0, step=0.01)] = 0.5

    def run(self, ctx: RunContext):
        # Standard normal noise from a CPU generator seeded with `seed`, as torch.manual_seed(seed) would give.
        generator = torch.Generator("cpu").manual_seed(self.seed)
        noise = torch.randn(self.image.size(), generator=generator, device="cpu").to(self.image)
        return (torch.clip(self.image + self.strength * noise, min=0.0, max=1.0),)


class ImageScaleToMaxDimension(Node):
    category = "image/upscaling"
    outputs = (Output(IMAGE),)

    image: Annotated[Any, Socket(IMAGE)]
    upscale_method: Annotated[str, Combo(MAX_DIMENSION_METHODS)] = "area"
    largest_size: Annotated[int, Int(min=0, max=MAX_RESOLUTION, step=1)] = 512

    def run(self, ctx: RunContext):
        height, width = self.image.shape[1], self.image.shape[2]
        if height > width:
            width, height = round(width / height * self.largest_size), self.largest_size
        elif width > height:
            width, height = self.largest_size, round(height / width * self.largest_size)
        else:
            width = height = self.largest_size
        return (_resize(self.image, width, height, self.upscale_method, "largest_size"),)


class ResizeAndPadImage(Node):
    category = "image/transform"
    outputs = (Output(IMAGE),)

    image: Annotated[Any, Socket(IMAGE)]
    target_width: Annotated[int, Int(min=1, max=MAX_RESOLUTION, step=1)] = 512
    target_height: Annotated[int, Int(min=1, max=MAX_RESOLUTION, step=1)] = 512
    padding_color: Annotated[str, Combo(("white", "black"))] = "white"
    interpolation: Annotated[str, Combo(PAD_INTERPOLATIONS)] = "area"

    def run(self, ctx: RunContext):
        image = self.image
        batch, height, width, channels = image.shape
        # Fit inside the target keeping the aspect ratio (sizes truncated), then centre on the padding colour.
        scale = min(self.target_width / width, self.target_height / height)
        new_width, new_height = int(width * scale), int(height * scale)
        resized = _resize(image, new_width, new_height, self.interpolation, "target_width")
        fill = 0.0 if self.padding_color == "black" else 1.0
        padded = torch.full((batch, self.target_height, self.target_width, channels), fill, dtype=image.dtype,
                            device=image.device)
        top, left = (self.target_height - new_height) // 2, (self.target_width - new_width) // 2
        padded[:, top:top + new_height, left:left + new_width] = resized
        return (padded,)


class GetImageSize(Node):
    display_name = "Get Image Size"
    category = "image"
    description = "Returns width and height of the image, and passes it through unchanged."
    outputs = (Output(INT, name="width"), Output(INT, name="height"), Output(INT, name="batch_size"))

    image: Annotated[Any, Socket(IMAGE)]

    def run(self, ctx: RunContext):
        batch, height, width = (int(size) for size in self.image.shape[:3])
        return NodeOutput((width, height, batch),
                          ui={"text": [f"width: {width}, height: {height}\n batch size: {batch}"]})


# Loading (nodes.py LoadImageOutput, comfy_extras/nodes_webcam.py) --------------------------------------------------


class LoadImageOutput(LoadImage):
    """LoadImage whose combo lists the output folder: the editor fills it from /internal/files/output and sends
    annotated names ('x.png [output]'). Names resolve as LoadImage's do (an unannotated name is in input/)."""

    display_name = "Load Image (from Outputs)"
    description = ("Load an image from the output folder. When the refresh button is clicked, the node will update "
                   "the image list and automatically select the first image, allowing for easy iteration.")
    experimental = True

    # A combo without listed options: the editor asks the route for them; the node checks the name itself.
    image: Annotated[str, InputSpec(COMBO, check_value=False, extra={
        "image_upload": True, "image_folder": "output",
        "remote": {"route": "/internal/files/output", "refresh_button": True, "control_after_refresh": "first"}})]


class WebcamCapture(Node):
    """The editor captures a frame, uploads it (to temp/webcam/) and sends its annotated name as `image`; the
    capture size and capture_on_queue are the editor's business, so here the node loads that file as LoadImage
    does (ComfyUI's node is a LoadImage with these widgets that returns the image only)."""

    display_name = "Webcam Capture"
    category = "image"
    outputs = (Output(IMAGE),)

    image: Annotated[str, Socket("WEBCAM")]
    width: Annotated[int, Int(min=0, max=MAX_RESOLUTION, step=1)] = 0
    height: Annotated[int, Int(min=0, max=MAX_RESOLUTION, step=1)] = 0
    capture_on_queue: Annotated[bool, Boolean()] = True

    @classmethod
    def validate_inputs(cls, env: Environment, constants: dict[str, Any], input_types: dict[str, str]) -> bool | str:
        name = constants.get("image")
        if name is not None and not isinstance(name, str):
            return f"Invalid image file: {name}"
        return LoadImage.validate_inputs(env, constants, input_types)

    @classmethod
    def fingerprint(cls, env: Environment, constants: dict[str, Any]) -> Any:
        return LoadImage.fingerprint(env, constants)

    def run(self, ctx: RunContext):
        image, _mask = LoadImage.model_construct(image=self.image).run(ctx)
        return (image,)


NODES = [ImageBlend, ImageBlur, ImageSharpen, ImageQuantize, Morphology, ImageRGBToYUV, ImageYUVToRGB, ImageFlip,
         ImageRotate, ImageStitch, ImageFromBatch, RebatchImages, RepeatImageBatch, ImageAddNoise,
         ImageScaleToMaxDimension, ResizeAndPadImage, GetImageSize, LoadImageOutput, WebcamCapture]
