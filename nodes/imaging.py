"""Pixel maths shared by the mask and image-operation nodes (nodes/masks.py, nodes/image_ops.py), with ComfyUI's
numerics: batch repetition, masked compositing, Porter-Duff operators, mask feathering and growing, Gaussian
filtering and ordered dithering.

IMAGE = [B,H,W,C] float 0..1; MASK = [B,H,W] (1 = masked), also accepted as [H,W] or [B,1,H,W].
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .diffusion.resize import common_upscale

PORTER_DUFF_MODES = ("ADD", "CLEAR", "DARKEN", "DST", "DST_ATOP", "DST_IN", "DST_OUT", "DST_OVER", "LIGHTEN",
                     "MULTIPLY", "OVERLAY", "SCREEN", "SRC", "SRC_ATOP", "SRC_IN", "SRC_OUT", "SRC_OVER", "XOR")


def mask_batch(mask: torch.Tensor) -> torch.Tensor:
    """Any accepted MASK layout as [B,H,W]."""
    return mask.reshape(-1, mask.shape[-2], mask.shape[-1])


def repeat_to_batch(tensor: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Cut a longer batch to `batch_size`, or cycle a shorter one (a, b, a, b, ...) up to it."""
    count = tensor.shape[0]
    if count > batch_size:
        return tensor[:batch_size]
    if count < batch_size:
        repeats = [math.ceil(batch_size / count)] + [1] * (tensor.ndim - 1)
        return tensor.repeat(repeats)[:batch_size]
    return tensor


def match_alpha(destination: torch.Tensor, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Give two IMAGEs the same channel count: an RGBA source over an RGB destination loses its alpha; an RGB
    source over an RGBA destination gains an opaque alpha channel.

    (ComfyUI 0.3.64's helper pads the destination instead in the second case, which then fails on the channel
    mismatch; the source is padded here so that the combination works.)
    """
    if destination.shape[-1] < source.shape[-1]:
        return destination, source[..., :destination.shape[-1]]
    if destination.shape[-1] > source.shape[-1]:
        missing = destination.shape[-1] - source.shape[-1]
        return destination, F.pad(source, (0, missing), value=1.0)
    return destination, source


def composite(destination: torch.Tensor, source: torch.Tensor, x: int, y: int, mask: torch.Tensor | None,
              multiplier: int, resize_source: bool) -> torch.Tensor:
    """Paste `source` [B,C,h,w] into a copy of `destination` [B,C,H,W] with its top-left corner at (x, y) (in
    units of 1/multiplier pixel, floored), blended by `mask` (resized bilinearly to the source; none = opaque).

    The source (and then the mask) batch is repeated or cut to the destination's batch; the parts of the source
    that fall outside the destination are dropped.
    """
    destination = destination.clone()
    source = source.to(destination.device)
    if resize_source:
        source = F.interpolate(source, size=destination.shape[-2:], mode="bilinear")
    source = repeat_to_batch(source, destination.shape[0])
    x = max(-source.shape[-1] * multiplier, min(x, destination.shape[-1] * multiplier))
    y = max(-source.shape[-2] * multiplier, min(y, destination.shape[-2] * multiplier))
    left, top = x // multiplier, y // multiplier
    right, bottom = left + source.shape[-1], top + source.shape[-2]
    if mask is None:
        weight = torch.ones_like(source)
    else:
        weight = mask.to(destination.device).reshape(-1, 1, mask.shape[-2], mask.shape[-1])
        weight = repeat_to_batch(F.interpolate(weight, size=source.shape[-2:], mode="bilinear"), source.shape[0])
    visible_width = destination.shape[-1] - left + min(0, x)
    visible_height = destination.shape[-2] - top + min(0, y)
    weight = weight[:, :, :visible_height, :visible_width]
    pasted = weight * source[..., :visible_height, :visible_width]
    kept = (1.0 - weight) * destination[..., top:bottom, left:right]
    destination[..., top:bottom, left:right] = pasted + kept
    return destination


def porter_duff(source: torch.Tensor, source_mask: torch.Tensor, destination: torch.Tensor,
                destination_mask: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One Porter-Duff operator on [H,W,C] images whose masks [H,W,1] are 1 - alpha. Returns (image, mask).

    The operators work on premultiplied colours; the result is divided by its alpha again (0 where the alpha is
    below 1e-5) and clamped to 0..1.
    """
    src_a, dst_a = 1.0 - source_mask, 1.0 - destination_mask
    src, dst = source * src_a, destination * dst_a
    union_a = src_a + dst_a - src_a * dst_a
    if mode == "ADD":
        alpha, color = torch.clamp(src_a + dst_a, 0, 1), torch.clamp(src + dst, 0, 1)
    elif mode == "CLEAR":
        alpha, color = torch.zeros_like(dst_a), torch.zeros_like(dst)
    elif mode == "DARKEN":
        alpha, color = union_a, (1 - dst_a) * src + (1 - src_a) * dst + torch.minimum(src, dst)
    elif mode == "DST":
        alpha, color = dst_a, dst
    elif mode == "DST_ATOP":
        alpha, color = src_a, src_a * dst + (1 - dst_a) * src
    elif mode == "DST_IN":
        alpha, color = src_a * dst_a, dst * src_a
    elif mode == "DST_OUT":
        alpha, color = (1 - src_a) * dst_a, (1 - src_a) * dst
    elif mode == "DST_OVER":
        alpha, color = dst_a + (1 - dst_a) * src_a, dst + (1 - dst_a) * src
    elif mode == "LIGHTEN":
        alpha, color = union_a, (1 - dst_a) * src + (1 - src_a) * dst + torch.maximum(src, dst)
    elif mode == "MULTIPLY":
        alpha, color = src_a * dst_a, src * dst
    elif mode == "OVERLAY":
        alpha = union_a
        color = torch.where(2 * dst < dst_a, 2 * src * dst, src_a * dst_a - 2 * (dst_a - src) * (src_a - dst))
    elif mode == "SCREEN":
        alpha, color = union_a, src + dst - src * dst
    elif mode == "SRC":
        alpha, color = src_a, src
    elif mode == "SRC_ATOP":
        alpha, color = dst_a, dst_a * src + (1 - src_a) * dst
    elif mode == "SRC_IN":
        alpha, color = src_a * dst_a, src * dst_a
    elif mode == "SRC_OUT":
        alpha, color = (1 - dst_a) * src_a, (1 - dst_a) * src
    elif mode == "SRC_OVER":
        alpha, color = src_a + (1 - src_a) * dst_a, src + (1 - src_a) * dst
    elif mode == "XOR":
        alpha, color = (1 - dst_a) * src_a + (1 - src_a) * dst_a, (1 - dst_a) * src + (1 - src_a) * dst
    else:
        raise ValueError(f"unknown Porter-Duff mode '{mode}'")
    color = torch.clamp(torch.where(alpha > 1e-5, color / alpha, torch.zeros_like(color)), 0, 1)
    return color, 1.0 - alpha


def resize_like(tensor_hwc: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[H,W,C] resized to [height,width,C] bicubically after a centre crop to the target's aspect."""
    resized = common_upscale(tensor_hwc.permute(2, 0, 1).unsqueeze(0), width, height, "bicubic", "center")
    return resized.squeeze(0).permute(1, 2, 0)


def feather(mask: torch.Tensor, left: int, top: int, right: int, bottom: int) -> torch.Tensor:
    """Linear fade-in of a [B,H,W] mask over the given number of pixels from each edge.

    ComfyUI's exact factors: pixel i from the left edge (i = 0, 1, ...) is scaled by (i + 1) / left. The right
    and bottom edges count their first step at index -0, i.e. the *first* column / row: so that column or row
    is scaled by 1 / right (1 / bottom), the outermost one by 2 / right, and pixel -right keeps its value.
    """
    height, width = mask.shape[-2], mask.shape[-1]
    left, right, top, bottom = min(left, width), min(right, width), min(top, height), min(bottom, height)
    output = mask.clone()
    for count, length, axis, from_end in ((left, width, -1, False), (right, width, -1, True),
                                          (top, height, -2, False), (bottom, height, -2, True)):
        if count == 0:
            continue
        factors = torch.ones(length, dtype=output.dtype, device=output.device)
        for step in range(count):
            index = (-step) % length if from_end else step
            factors[index] *= (step + 1) / count
        output = output * (factors if axis == -1 else factors[:, None])
    return output


def grow(mask: torch.Tensor, expand: int, tapered_corners: bool) -> torch.Tensor:
    """Dilate (expand > 0) or erode (expand < 0) a [B,H,W] mask |expand| times with a 3x3 footprint: a cross
    when `tapered_corners`, else the full square. Pixels outside the mask are ignored, as in a grey-level
    min/max filter with the edge repeated."""
    steps = min(abs(expand), mask.shape[-1] + mask.shape[-2])  # beyond that the result no longer changes
    if steps == 0:
        return mask.clone()
    erode = expand < 0
    fill = float("inf") if erode else float("-inf")
    reduce = torch.minimum if erode else torch.maximum
    output = mask.float()
    height, width = output.shape[-2], output.shape[-1]
    for _ in range(steps):
        padded = F.pad(output, (1, 1, 1, 1), value=fill)
        if tapered_corners:
            shifted = [padded[:, 1:1 + height, 1:1 + width], padded[:, :height, 1:1 + width],
                       padded[:, 2:2 + height, 1:1 + width], padded[:, 1:1 + height, :width],
                       padded[:, 1:1 + height, 2:2 + width]]
            result = shifted[0]
            for other in shifted[1:]:
                result = reduce(result, other)
            output = result
        else:  # the square is separable: rows, then columns
            rows = reduce(reduce(padded[:, :, :width], padded[:, :, 1:1 + width]), padded[:, :, 2:2 + width])
            output = reduce(reduce(rows[:, :height], rows[:, 1:1 + height]), rows[:, 2:2 + height])
    return output.to(mask.dtype)


def gaussian_kernel(size: int, sigma: float, dtype: torch.dtype = torch.float32,
                    device: torch.device | None = None) -> torch.Tensor:
    """ComfyUI's normalised size x size Gaussian: the grid spans -1..1 whatever the size, so sigma is relative to
    the radius."""
    axis = torch.linspace(-1, 1, size, device=device)
    rows, cols = torch.meshgrid(axis, axis, indexing="ij")
    distance = torch.sqrt(rows * rows + cols * cols)
    weights = torch.exp(-(distance * distance) / (2.0 * sigma * sigma))
    return (weights / weights.sum()).to(dtype)


def filter_reflect(image: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Correlate every channel of an IMAGE [B,H,W,C] with a square odd-sized kernel, the borders mirrored
    without repeating the edge pixel (torch's 'reflect')."""
    radius = kernel.shape[-1] // 2
    channels = image.shape[-1]
    planes = F.pad(image.permute(0, 3, 1, 2), (radius, radius, radius, radius), mode="reflect")
    weights = kernel.to(planes.dtype).expand(channels, 1, *kernel.shape)
    return F.conv2d(planes, weights, groups=channels).permute(0, 2, 3, 1)


def bayer_matrix(order: int) -> np.ndarray:
    """The order x order ordered-dither threshold matrix (order a power of two), centred on 0, in (-0.5, 0.5):
    entry = (classic Bayer index + 0.5) / order² - 0.5."""
    matrix = np.zeros((1, 1), dtype=np.float32)
    level = 0
    while matrix.shape[0] < order:
        level += 1
        scale = 4 ** level
        scaled = scale * matrix
        matrix = np.block([[scaled - 1.5, scaled + 0.5], [scaled + 1.5, scaled - 0.5]]) / scale
    return matrix.astype(np.float32)


def spacing_fill(color: str, channels: int) -> list[float]:
    """The per-channel value of a spacer / padding colour name; a 4th channel is opaque."""
    rgb = {"white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0), "red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0),
           "blue": (0.0, 0.0, 1.0)}[color]
    values = list(rgb[:channels]) + [0.0] * max(0, channels - 3)
    if channels == 4:
        values[3] = 1.0
    return values
