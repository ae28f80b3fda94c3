"""Tile-by-tile application of resolution-changing image functions: ComfyUI's `tiled_scale` (two spatial dims),
shared by the VAE's tiled decode / encode and ImageUpscaleWithModel.

Tiles start every (tile - overlap) cells along each side; the last start is pulled back so it does not begin
inside the overlap, and tiles at the far border are cut short there (not shifted back to full size). Each tile's
output is weighted by a feather that ramps linearly, (t+1)/f for t = 0..f-1, over the f = round(overlap * scale)
outermost rows and columns on every side (no ramp along a side that is not longer than f); the weighted outputs
are summed and divided by the summed weights. An image that fits one tile is passed whole.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch

Progress = Callable[[int, int], None]

# ComfyUI's ImageUpscaleWithModel: 512-pixel tiles overlapping by 32; after an out-of-memory error the tile is
# halved, and the error is raised once the tile would drop below 128.
UPSCALE_TILE = 512
UPSCALE_OVERLAP = 32
UPSCALE_MIN_TILE = 128


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


def feather(length: int, width: int) -> torch.Tensor:
    """1-D tile weights: ramps (t+1)/width over `width` cells at both ends (none if the tile is not longer)."""
    weights = torch.ones(length)
    if 0 < width < length:
        ramp = torch.arange(1, width + 1, dtype=torch.float32) / width
        weights[:width] *= ramp
        weights[length - width:] *= ramp.flip(0)
    return weights


def tiled_apply(samples: torch.Tensor, function: Callable[[torch.Tensor], torch.Tensor], tile_hw: tuple[int, int],
                overlap: int, scale: float, out_channels: int, on_tile: Callable[[], None] | None = None,
                align: int = 1) -> torch.Tensor:
    """Apply a resolution-changing `function` ([1,C,h,w] -> [1,out_channels,h*scale,w*scale]) tile by tile to
    [B,C,H,W], blending overlaps with linear feathers; one image at a time to bound memory. Float32 on the CPU."""
    batch, _, height, width = samples.shape
    plan = TilePlan.create((height, width), tile_hw, overlap, align)
    out_h, out_w = round(height * scale), round(width * scale)
    feather_width = round(plan.overlap * scale)
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
            mask = feather(piece_h, feather_width)[:, None] * feather(piece_w, feather_width)[None, :]
            out_top, out_left = round(top * scale), round(left * scale)
            total[:, :, out_top:out_top + piece_h, out_left:out_left + piece_w] += result * mask
            weight[:, :, out_top:out_top + piece_h, out_left:out_left + piece_w] += mask
            if on_tile:
                on_tile()
        output[index:index + 1] = total / weight
    return output


class TileProgress:
    """Turns per-tile callbacks into progress(value, total) reports."""

    def __init__(self, total: int, progress: Progress | None):
        self.total, self.done, self.progress = total, 0, progress

    def step(self) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total)


def upscale_tiled(images: torch.Tensor, function: Callable[[torch.Tensor], torch.Tensor], scale: int,
                  out_channels: int, tile: int = UPSCALE_TILE, overlap: int = UPSCALE_OVERLAP,
                  min_tile: int = UPSCALE_MIN_TILE, progress: Progress | None = None,
                  on_out_of_memory: Callable[[int], None] | None = None) -> torch.Tensor:
    """ComfyUI's model upscale of [B,C,H,W]: square tiles of `tile` pixels, overlapping by `overlap`. After an
    out-of-memory error the whole pass restarts with half the tile (`on_out_of_memory(new_tile)` is told first,
    and progress counts from zero again); the error propagates when the tile would drop below `min_tile`."""
    size_hw = (images.shape[2], images.shape[3])
    while True:
        tiles = images.shape[0] * TilePlan.create(size_hw, (tile, tile), overlap).count
        counter = TileProgress(tiles, progress)
        try:
            return tiled_apply(images, function, (tile, tile), overlap, scale, out_channels, counter.step)
        except torch.OutOfMemoryError:
            if tile // 2 < min_tile:
                raise
        # Retried outside the except block, so the failed attempt's tensors are already freed.
        tile //= 2
        if on_out_of_memory is not None:
            on_out_of_memory(tile)
