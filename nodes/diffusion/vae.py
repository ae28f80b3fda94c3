"""The object that flows through VAE links: a diffusers AutoencoderKL plus ComfyUI's pixel/latent conventions.

Conventions (ComfyUI's `comfy.sd.VAE`, see docs/comfyui-reference.md#vae-conventions):
* encode: IMAGE [B,H,W,C] 0..1 -> first 3 channels -> H and W cropped (centred) down to multiples of 8 ->
  x*2-1 -> encoder + quant_conv -> the posterior's **mean** (no sampling, no RNG) -> float32, unscaled.
* decode: unscaled latent -> decoder -> clamp((x+1)/2, 0, 1) -> IMAGE [B,H,W,3] float32 on CPU.
* Both run in batches sized by free memory, and fall back to tiles on out-of-memory.

Tiling (ComfyUI's `tiled_scale_multidim`): tiles start every (tile - overlap) cells; each tile's output is
weighted by a feather that ramps linearly (t+1)/f over the f = overlap*scale outermost rows/columns on every
side, the weighted outputs are summed and divided by the summed weights. A tiled pass is done with three tile
shapes (square, wide, tall) and the three results averaged, which hides the seams of any one tiling.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .models import SD15_LATENT, LatentFormat

logger = logging.getLogger(__name__)

Progress = Callable[[int, int], None]

DOWNSCALE = 8
# ComfyUI's working-memory estimates for an SD-style AutoencoderKL, in bytes per element of dtype size.
_ENCODE_BYTES_PER_PIXEL = 1767
_DECODE_BYTES_PER_LATENT_CELL = 2178 * 64


def crop_to_multiple(pixels: torch.Tensor, multiple: int = DOWNSCALE) -> torch.Tensor:
    """Crop IMAGE [B,H,W,C] down to multiples of `multiple`, centred (offset (size % multiple) // 2)."""
    height, width = pixels.shape[1], pixels.shape[2]
    new_height, new_width = height // multiple * multiple, width // multiple * multiple
    if (new_height, new_width) == (height, width):
        return pixels
    top, left = (height % multiple) // 2, (width % multiple) // 2
    return pixels[:, top:top + new_height, left:left + new_width, :]


@dataclass(frozen=True)
class TilePlan:
    """Where the tiles of one image go. Tile sizes, overlap and positions are multiples of `align` (8 when
    encoding, so every tile maps to whole latent cells), and the overlap stays below the tile size so tiles
    always advance (ComfyUI fails on such settings instead)."""

    tile_h: int
    tile_w: int
    overlap: int
    rows: tuple[int, ...]
    cols: tuple[int, ...]

    @classmethod
    def create(cls, size_hw: tuple[int, int], tile_hw: tuple[int, int], overlap: int, align: int = 1) -> TilePlan:
        tile_h, tile_w = (max(align, size // align * align) for size in tile_hw)
        overlap = max(0, min(overlap // align * align, min(tile_h, tile_w) - align))
        if size_hw[0] <= tile_h and size_hw[1] <= tile_w:
            return cls(tile_h, tile_w, overlap, (0,), (0,))
        return cls(tile_h, tile_w, overlap, cls._starts(size_hw[0], tile_h, overlap),
                   cls._starts(size_hw[1], tile_w, overlap))

    @staticmethod
    def _starts(size: int, tile: int, overlap: int) -> tuple[int, ...]:
        # Every (tile - overlap) cells; the last start is pulled back so it does not begin inside the overlap.
        if size <= tile:
            return (0,)
        return tuple(max(0, min(size - overlap, start)) for start in range(0, size - overlap, tile - overlap))

    @property
    def count(self) -> int:
        return len(self.rows) * len(self.cols)


def _feather(length: int, feather: int) -> torch.Tensor:
    """1-D tile weights: ramps (t+1)/feather over `feather` cells at both ends (none if the tile is too short)."""
    weights = torch.ones(length)
    if 0 < feather < length:
        ramp = torch.arange(1, feather + 1, dtype=torch.float32) / feather
        weights[:feather] *= ramp
        weights[length - feather:] *= ramp.flip(0)
    return weights


def tiled_apply(samples: torch.Tensor, function: Callable[[torch.Tensor], torch.Tensor], tile_hw: tuple[int, int],
                overlap: int, scale: float, out_channels: int, on_tile: Callable[[], None] | None = None,
                align: int = 1) -> torch.Tensor:
    """Apply a resolution-changing `function` ([1,C,h,w] -> [1,out_channels,h*scale,w*scale]) tile by tile to
    [B,C,H,W], blending overlaps with linear feathers; one image at a time to bound memory."""
    batch, _, height, width = samples.shape
    plan = TilePlan.create((height, width), tile_hw, overlap, align)
    out_h, out_w = round(height * scale), round(width * scale)
    feather = round(plan.overlap * scale)
    output = torch.empty(batch, out_channels, out_h, out_w)
    for index in range(batch):
        image = samples[index:index + 1]
        if plan.count == 1:
            output[index:index + 1] = function(image).float().cpu()
            if on_tile:
                on_tile()
            continue
        total = torch.zeros(1, out_channels, out_h, out_w)
        weight = torch.zeros(1, 1, out_h, out_w)
        for top, left in itertools.product(plan.rows, plan.cols):
            piece = image[:, :, top:top + plan.tile_h, left:left + plan.tile_w]
            result = function(piece).float().cpu()
            piece_h, piece_w = result.shape[-2:]
            mask = _feather(piece_h, feather)[:, None] * _feather(piece_w, feather)[None, :]
            out_top, out_left = round(top * scale), round(left * scale)
            total[:, :, out_top:out_top + piece_h, out_left:out_left + piece_w] += result * mask
            weight[:, :, out_top:out_top + piece_h, out_left:out_left + piece_w] += mask
            if on_tile:
                on_tile()
        output[index:index + 1] = total / weight
    return output


def _free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 1024 ** 3


def _release_cached_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _placement(module: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    parameter = next(module.parameters(), None)
    if parameter is None:
        return torch.device("cpu"), torch.float32
    return parameter.device, parameter.dtype


class _ProgressCounter:
    """Turns per-tile callbacks into progress(value, total) reports."""

    def __init__(self, total: int, progress: Progress | None):
        self.total, self.done, self.progress = total, 0, progress

    def step(self) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total)


@dataclass(frozen=True)
class VAEModel:
    """What a VAE link carries: the autoencoder (diffusers AutoencoderKL) and the latent format it pairs with."""

    autoencoder: torch.nn.Module
    latent_format: LatentFormat = SD15_LATENT
    source: str = ""
    # Tilings used when a whole decode / encode runs out of memory (latent cells / pixels, as ComfyUI).
    fallback_decode_tile: int = 64
    fallback_decode_overlap: int = 16
    fallback_encode_tile: int = 512
    fallback_encode_overlap: int = 64
    # Pixels per latent cell along each side.
    downscale_ratio: int = DOWNSCALE

    @property
    def latent_channels(self) -> int:
        config = getattr(self.autoencoder, "config", None)
        return int(getattr(config, "latent_channels", self.latent_format.channels))

    def cache_nbytes(self) -> int:
        # The weights are owned (and counted) by the model memory manager, not by the output cache.
        return 0

    @contextlib.contextmanager
    def _ready(self, manager: Any) -> Iterator[torch.nn.Module]:
        lease = manager.use(self.autoencoder) if manager is not None else contextlib.nullcontext(self.autoencoder)
        with lease as module, torch.no_grad():
            yield module

    # Raw calls on one chunk ----------------------------------------------------------------------------------

    @staticmethod
    def _decode_raw(module: torch.nn.Module, latent: torch.Tensor) -> torch.Tensor:
        device, dtype = _placement(module)
        return module.decode(latent.to(device=device, dtype=dtype)).sample.float()

    @staticmethod
    def _encode_raw(module: torch.nn.Module, pixels_nchw: torch.Tensor) -> torch.Tensor:
        """pixels NCHW in 0..1 -> latent mean, float32."""
        device, dtype = _placement(module)
        scaled = (pixels_nchw * 2.0 - 1.0).to(device=device, dtype=dtype)
        return module.encode(scaled).latent_dist.mode().float()

    @staticmethod
    def _to_image(decoded: torch.Tensor) -> torch.Tensor:
        return torch.clamp((decoded + 1.0) / 2.0, 0.0, 1.0).movedim(1, -1).cpu()

    def _check_latent(self, latent: torch.Tensor) -> torch.Tensor:
        if latent.ndim != 4:
            raise ValueError(f"VAE decode expects a latent [B,C,H,W], got shape {tuple(latent.shape)}")
        if latent.shape[1] != self.latent_channels:
            raise ValueError(f"VAE decode expects {self.latent_channels} latent channels, got {latent.shape[1]}")
        return latent

    @staticmethod
    def _prepare_pixels(pixels: torch.Tensor) -> torch.Tensor:
        if pixels.ndim != 4 or pixels.shape[-1] < 3:
            raise ValueError(f"VAE encode expects an IMAGE [B,H,W,3], got shape {tuple(pixels.shape)}")
        pixels = crop_to_multiple(pixels[..., :3])
        if pixels.shape[1] == 0 or pixels.shape[2] == 0:
            raise ValueError("VAE encode needs an image of at least 8x8 pixels")
        return pixels.movedim(-1, 1)

    def _batch_size(self, module: torch.nn.Module, bytes_per_item: int) -> int:
        device, dtype = _placement(module)
        needed = bytes_per_item * torch.finfo(dtype).bits // 8
        return max(1, int(_free_memory(device) // max(1, needed)))

    # Decode ------------------------------------------------------------------------------------------------

    def decode(self, latent: torch.Tensor, manager: Any = None, progress: Progress | None = None) -> torch.Tensor:
        """Unscaled latent [B,C,h,w] -> IMAGE [B,8h,8w,3] in 0..1; tiled decode if the whole one runs out of memory."""
        latent = self._check_latent(latent)
        with self._ready(manager) as module:
            try:
                per_item = _DECODE_BYTES_PER_LATENT_CELL * latent.shape[2] * latent.shape[3]
                batch = self._batch_size(module, per_item)
                chunks = [self._to_image(self._decode_raw(module, latent[i:i + batch]))
                          for i in range(0, latent.shape[0], batch)]
                return torch.cat(chunks)
            except torch.OutOfMemoryError:
                logger.warning("out of memory in VAE decode, retrying with tiled decode")
            # Retried outside the except block, so the failed attempt's tensors are already freed.
            _release_cached_memory(_placement(module)[0])
            return self._decode_tiled(module, latent, (self.fallback_decode_tile,) * 2,
                                      self.fallback_decode_overlap, progress)

    def decode_tiled(self, latent: torch.Tensor, tile: int | tuple[int, int] = 64, overlap: int = 16,
                     manager: Any = None, progress: Progress | None = None) -> torch.Tensor:
        """Tiled decode; tile (width, height) and overlap in latent cells."""
        latent = self._check_latent(latent)
        tile_wh = (tile, tile) if isinstance(tile, int) else tuple(tile)
        with self._ready(manager) as module:
            return self._decode_tiled(module, latent, tile_wh, overlap, progress)

    def _decode_tiled(self, module: torch.nn.Module, latent: torch.Tensor, tile_wh: tuple[int, int], overlap: int,
                      progress: Progress | None) -> torch.Tensor:
        tile_w, tile_h = tile_wh
        # Three tilings, averaged: tall, wide, then square (ComfyUI's order, so the float sums agree).
        tilings = [(tile_h * 2, max(1, tile_w // 2)), (max(1, tile_h // 2), tile_w * 2), (tile_h, tile_w)]
        size_hw = (latent.shape[2], latent.shape[3])
        tiles = sum(TilePlan.create(size_hw, tiling, overlap).count for tiling in tilings)
        counter = _ProgressCounter(latent.shape[0] * tiles, progress)
        out_channels = int(getattr(getattr(module, "config", None), "out_channels", 3))
        decoded = None
        for tiling in tilings:
            part = tiled_apply(latent, lambda x: self._decode_raw(module, x), tiling, overlap, self.downscale_ratio,
                               out_channels, counter.step)
            decoded = part if decoded is None else decoded + part
        return self._to_image(decoded / 3.0)

    # Encode ------------------------------------------------------------------------------------------------

    def encode(self, pixels: torch.Tensor, manager: Any = None, progress: Progress | None = None) -> torch.Tensor:
        """IMAGE [B,H,W,C] 0..1 -> unscaled latent mean [B,4,H//8,W//8] float32 on CPU."""
        nchw = self._prepare_pixels(pixels)
        with self._ready(manager) as module:
            try:
                batch = self._batch_size(module, _ENCODE_BYTES_PER_PIXEL * nchw.shape[2] * nchw.shape[3])
                chunks = [self._encode_raw(module, nchw[i:i + batch]).cpu() for i in range(0, nchw.shape[0], batch)]
                return torch.cat(chunks)
            except torch.OutOfMemoryError:
                logger.warning("out of memory in VAE encode, retrying with tiled encode")
            _release_cached_memory(_placement(module)[0])
            return self._encode_tiled(module, nchw, (self.fallback_encode_tile,) * 2, self.fallback_encode_overlap,
                                      progress)

    def encode_tiled(self, pixels: torch.Tensor, tile: int | tuple[int, int] = 512, overlap: int = 64,
                     manager: Any = None, progress: Progress | None = None) -> torch.Tensor:
        """Tiled encode; tile (width, height) and overlap in pixels."""
        nchw = self._prepare_pixels(pixels)
        tile_wh = (tile, tile) if isinstance(tile, int) else tuple(tile)
        with self._ready(manager) as module:
            return self._encode_tiled(module, nchw, tile_wh, overlap, progress)

    def _encode_tiled(self, module: torch.nn.Module, nchw: torch.Tensor, tile_wh: tuple[int, int], overlap: int,
                      progress: Progress | None) -> torch.Tensor:
        tile_w, tile_h = tile_wh
        # Square, wide, then tall (ComfyUI's order for encode).
        tilings = [(tile_h, tile_w), (max(1, tile_h // 2), tile_w * 2), (tile_h * 2, max(1, tile_w // 2))]
        size_hw = (nchw.shape[2], nchw.shape[3])
        tiles = sum(TilePlan.create(size_hw, tiling, overlap, self.downscale_ratio).count for tiling in tilings)
        counter = _ProgressCounter(nchw.shape[0] * tiles, progress)
        encoded = None
        for tiling in tilings:
            part = tiled_apply(nchw, lambda x: self._encode_raw(module, x), tiling, overlap, 1 / self.downscale_ratio,
                               self.latent_channels, counter.step, align=self.downscale_ratio)
            encoded = part if encoded is None else encoded + part
        return encoded / 3.0
