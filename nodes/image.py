"""Image nodes: load, save, preview, resize, invert, batch, pad and crop (ComfyUI's names and numerics).

IMAGE = float32 [B,H,W,3] in 0..1 on CPU; MASK = float32 [B,H,W], 1 = masked.
"""

from __future__ import annotations

import math
import secrets
from pathlib import Path
from typing import Annotated, Any

import torch

from latentloom.engine.environment import Environment
from latentloom.engine.inputs import InputError, MissingInputFile
from latentloom.engine.node import Node, NodeOutput, RunContext
from latentloom.engine.types import IMAGE, MASK, Combo, Float, Int, Output, Socket, String

from .diffusion.resize import CROP_METHODS, IMAGE_UPSCALE_METHODS, common_upscale
from .image_files import (
    file_fingerprint,
    list_input_images,
    load_image_file,
    load_mask_file,
    png_metadata,
    resolve_annotated_path,
    save_images,
)

MAX_RESOLUTION = 16384
# ComfyUI's alphabet for preview name suffixes.
_PREVIEW_LETTERS = "abcdefghijklmnopqrstupvxyz"


def _input_image_path(env: Environment, name: str) -> Path:
    try:
        path = resolve_annotated_path(env, name)
    except ValueError as error:
        raise InputError("image", str(error)) from None
    if not path.is_file():
        raise MissingInputFile("image", f"image file '{name}' not found ({path})")
    return path


def _validate_image_name(env: Environment | None, constants: dict[str, Any]) -> bool | str:
    name = constants.get("image")
    if name is None:  # linked: checked when it runs
        return True
    try:
        path = resolve_annotated_path(env, str(name))
    except ValueError:
        return f"Invalid image file: {name}"
    return True if path.is_file() else f"Invalid image file: {name}"


def _image_fingerprint(env: Environment | None, constants: dict[str, Any]) -> Any:
    name = constants.get("image")
    if name is None or env is None:
        return None
    try:
        path = resolve_annotated_path(env, str(name))
        return file_fingerprint(path)
    except (OSError, ValueError):
        return f"unreadable:{name}"


class LoadImage(Node):
    display_name = "Load Image"
    category = "image"
    outputs = (Output(IMAGE), Output(MASK))

    # Annotated ('x.png [output]') and subfolder names are valid too, so the node checks names itself.
    image: Annotated[str, Combo(list_input_images, check_value=False, image_upload=True)]

    @classmethod
    def validate_inputs(cls, env: Environment, constants: dict[str, Any], input_types: dict[str, str]) -> bool | str:
        return _validate_image_name(env, constants)

    @classmethod
    def fingerprint(cls, env: Environment, constants: dict[str, Any]) -> Any:
        return _image_fingerprint(env, constants)

    def run(self, ctx: RunContext):
        path = _input_image_path(ctx.env, self.image)
        try:
            image, mask = load_image_file(path)
        except (OSError, SyntaxError) as error:  # PIL reports broken files as OSError / SyntaxError
            raise InputError("image", f"cannot read image file '{self.image}': {error}") from None
        return (image, mask)


class LoadImageMask(Node):
    display_name = "Load Image (as Mask)"
    category = "mask"
    outputs = (Output(MASK),)

    image: Annotated[str, Combo(list_input_images, check_value=False, image_upload=True)]
    channel: Annotated[str, Combo(("alpha", "red", "green", "blue"))] = "alpha"

    @classmethod
    def validate_inputs(cls, env: Environment, constants: dict[str, Any], input_types: dict[str, str]) -> bool | str:
        return _validate_image_name(env, constants)

    @classmethod
    def fingerprint(cls, env: Environment, constants: dict[str, Any]) -> Any:
        return _image_fingerprint(env, constants)

    def run(self, ctx: RunContext):
        path = _input_image_path(ctx.env, self.image)
        try:
            return (load_mask_file(path, self.channel),)
        except (OSError, SyntaxError) as error:
            raise InputError("image", f"cannot read image file '{self.image}': {error}") from None


def _metadata(ctx: RunContext):
    if getattr(ctx.env, "disable_metadata", False):
        return None
    extra = (ctx.extra_data or {}).get("extra_pnginfo")
    return png_metadata(ctx.prompt, extra if isinstance(extra, dict) else None)


class SaveImage(Node):
    display_name = "Save Image"
    category = "image"
    description = "Saves the input images to your ComfyUI output directory."
    output_node = True

    images: Annotated[Any, Socket(IMAGE, tooltip="The images to save.")]
    filename_prefix: Annotated[str, String(tooltip=(
        "The prefix for the file to save. This may include formatting information such as %date:yyyy-MM-dd% or "
        "%Empty Latent Image.width% to include values from nodes."))] = "ComfyUI"

    def run(self, ctx: RunContext):
        images = self.images
        try:
            results = save_images(images, Path(ctx.env.output_dir), self.filename_prefix, "output", 4, _metadata(ctx))
        except ValueError as error:
            raise InputError("filename_prefix", str(error)) from None
        return NodeOutput(ui={"images": results})


class PreviewImage(Node):
    display_name = "Preview Image"
    category = "image"
    description = "Saves the input images to your ComfyUI temp directory."
    output_node = True

    images: Annotated[Any, Socket(IMAGE)]

    def run(self, ctx: RunContext):
        images = self.images
        suffix = "".join(secrets.choice(_PREVIEW_LETTERS) for _ in range(5))
        results = save_images(images, Path(ctx.env.temp_dir), f"ComfyUI_temp_{suffix}", "temp", 1, _metadata(ctx))
        return NodeOutput(ui={"images": results})


def _scale_image(image: torch.Tensor, width: int, height: int, method: str, crop: str) -> torch.Tensor:
    return common_upscale(image.movedim(-1, 1), width, height, method, crop).movedim(1, -1)


class ImageScale(Node):
    display_name = "Upscale Image"
    category = "image/upscaling"
    outputs = (Output(IMAGE),)

    image: Annotated[Any, Socket(IMAGE)]
    upscale_method: Annotated[str, Combo(IMAGE_UPSCALE_METHODS)] = "nearest-exact"
    width: Annotated[int, Int(min=0, max=MAX_RESOLUTION, step=1)] = 512
    height: Annotated[int, Int(min=0, max=MAX_RESOLUTION, step=1)] = 512
    crop: Annotated[str, Combo(CROP_METHODS)] = "disabled"

    def run(self, ctx: RunContext):
        image = self.image
        width, height = self.width, self.height
        if width == 0 and height == 0:
            return (image,)
        # One side 0 keeps the aspect ratio.
        if width == 0:
            width = max(1, round(image.shape[2] * height / image.shape[1]))
        elif height == 0:
            height = max(1, round(image.shape[1] * width / image.shape[2]))
        return (_scale_image(image, width, height, self.upscale_method, self.crop),)


class ImageScaleBy(Node):
    display_name = "Upscale Image By"
    category = "image/upscaling"
    outputs = (Output(IMAGE),)

    image: Annotated[Any, Socket(IMAGE)]
    upscale_method: Annotated[str, Combo(IMAGE_UPSCALE_METHODS)] = "nearest-exact"
    scale_by: Annotated[float, Float(min=0.01, max=8.0, step=0.01)] = 1.0

    def run(self, ctx: RunContext):
        image = self.image
        width = round(image.shape[2] * self.scale_by)
        height = round(image.shape[1] * self.scale_by)
        if width < 1 or height < 1:
            raise InputError("scale_by", f"{self.scale_by} makes the image empty")
        return (_scale_image(image, width, height, self.upscale_method, "disabled"),)


class ImageScaleToTotalPixels(Node):
    display_name = "Scale Image to Total Pixels"
    category = "image/upscaling"
    outputs = (Output(IMAGE),)

    image: Annotated[Any, Socket(IMAGE)]
    upscale_method: Annotated[str, Combo(IMAGE_UPSCALE_METHODS)] = "nearest-exact"
    megapixels: Annotated[float, Float(min=0.01, max=16.0, step=0.01)] = 1.0

    def run(self, ctx: RunContext):
        image = self.image
        # ComfyUI 0.3.64's rule: each side scaled by the same factor, rounded to whole pixels.
        total = self.megapixels * 1024 * 1024
        scale_by = math.sqrt(total / (image.shape[2] * image.shape[1]))
        width = max(1, round(image.shape[2] * scale_by))
        height = max(1, round(image.shape[1] * scale_by))
        return (_scale_image(image, int(width), int(height), self.upscale_method, "disabled"),)


class ImageInvert(Node):
    display_name = "Invert Image"
    category = "image"
    outputs = (Output(IMAGE),)

    image: Annotated[Any, Socket(IMAGE)]

    def run(self, ctx: RunContext):
        return (1.0 - self.image,)


class ImageBatch(Node):
    display_name = "Batch Images"
    category = "image"
    outputs = (Output(IMAGE),)

    image1: Annotated[Any, Socket(IMAGE)]
    image2: Annotated[Any, Socket(IMAGE)]

    def run(self, ctx: RunContext):
        first = self.image1
        second = self.image2
        if first.shape[1:3] != second.shape[1:3]:
            # The second batch is fitted to the first's size: centre-cropped to its aspect, then bilinear.
            second = _scale_image(second, first.shape[2], first.shape[1], "bilinear", "center")
        if first.shape[-1] != second.shape[-1]:
            raise InputError("image2", f"has {second.shape[-1]} channels, image1 has {first.shape[-1]}")
        return (torch.cat((first, second), dim=0),)


class EmptyImage(Node):
    category = "image"
    outputs = (Output(IMAGE),)

    width: Annotated[int, Int(min=1, max=MAX_RESOLUTION, step=1)] = 512
    height: Annotated[int, Int(min=1, max=MAX_RESOLUTION, step=1)] = 512
    batch_size: Annotated[int, Int(min=1, max=4096)] = 1
    color: Annotated[int, Int(min=0, max=0xFFFFFF, step=1, display="color")] = 0

    def run(self, ctx: RunContext):
        rgb = [((self.color >> shift) & 0xFF) / 0xFF for shift in (16, 8, 0)]
        return (torch.tensor(rgb, dtype=torch.float32).expand(self.batch_size, self.height, self.width, 3).clone(),)


def outpaint_feather_mask(height: int, width: int, left: int, top: int, right: int, bottom: int,
                          feathering: int) -> torch.Tensor:
    """Mask over the original image area: ((f - d) / f)^2 where d = distance to the nearest padded edge < f.

    Only edges that were padded count; the mask is all zero when 2*feathering does not fit the image.
    """
    mask = torch.zeros(height, width, dtype=torch.float32)
    if not (feathering > 0 and feathering * 2 < height and feathering * 2 < width):
        return mask
    rows = torch.arange(height, dtype=torch.float32)[:, None]
    cols = torch.arange(width, dtype=torch.float32)[None, :]
    far_h = torch.full((height, 1), float(height))
    far_w = torch.full((1, width), float(width))
    distance = torch.minimum(
        torch.minimum(rows if top else far_h, (height - rows) if bottom else far_h),
        torch.minimum(cols if left else far_w, (width - cols) if right else far_w),
    )
    inside = distance < feathering
    value = (feathering - distance) / feathering
    return torch.where(inside, value * value, mask)


class ImagePadForOutpaint(Node):
    display_name = "Pad Image for Outpainting"
    category = "image"
    outputs = (Output(IMAGE), Output(MASK))

    image: Annotated[Any, Socket(IMAGE)]
    left: Annotated[int, Int(min=0, max=MAX_RESOLUTION, step=8)] = 0
    top: Annotated[int, Int(min=0, max=MAX_RESOLUTION, step=8)] = 0
    right: Annotated[int, Int(min=0, max=MAX_RESOLUTION, step=8)] = 0
    bottom: Annotated[int, Int(min=0, max=MAX_RESOLUTION, step=8)] = 0
    feathering: Annotated[int, Int(min=0, max=MAX_RESOLUTION, step=1)] = 40

    def run(self, ctx: RunContext):
        image = self.image
        batch, height, width, channels = image.shape
        new_height, new_width = height + self.top + self.bottom, width + self.left + self.right
        padded = torch.full((batch, new_height, new_width, channels), 0.5, dtype=torch.float32)
        padded[:, self.top:self.top + height, self.left:self.left + width, :] = image
        mask = torch.ones(new_height, new_width, dtype=torch.float32)
        mask[self.top:self.top + height, self.left:self.left + width] = outpaint_feather_mask(
            height, width, self.left, self.top, self.right, self.bottom, self.feathering)
        return (padded, mask.unsqueeze(0))


class ImageCrop(Node):
    display_name = "Image Crop"
    category = "image/transform"
    outputs = (Output(IMAGE),)

    image: Annotated[Any, Socket(IMAGE)]
    width: Annotated[int, Int(min=1, max=MAX_RESOLUTION, step=1)] = 512
    height: Annotated[int, Int(min=1, max=MAX_RESOLUTION, step=1)] = 512
    x: Annotated[int, Int(min=0, max=MAX_RESOLUTION, step=1)] = 0
    y: Annotated[int, Int(min=0, max=MAX_RESOLUTION, step=1)] = 0

    def run(self, ctx: RunContext):
        image = self.image
        x = min(self.x, image.shape[2] - 1)
        y = min(self.y, image.shape[1] - 1)
        return (image[:, y:y + self.height, x:x + self.width, :],)


NODES = [LoadImage, LoadImageMask, SaveImage, PreviewImage, ImageScale, ImageScaleBy, ImageScaleToTotalPixels,
         ImageInvert, ImageBatch, EmptyImage, ImagePadForOutpaint, ImageCrop]
