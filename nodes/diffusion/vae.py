"""The object that flows through VAE links: a diffusers AutoencoderKL plus ComfyUI's pixel/latent conventions.

Conventions (ComfyUI's `comfy.sd.VAE`, see docs/comfyui-reference.md#vae-conventions):
* encode: IMAGE [B,H,W,C] 0..1 -> first 3 channels -> H and W cropped (centred) down to multiples of 8 ->
  x*2-1 -> encoder + quant_conv -> the posterior's **mean** (no sampling, no RNG) -> float32, unscaled.
* decode: unscaled latent -> decoder -> clamp((x+1)/2, 0, 1) -> IMAGE [B,H,W,3] float32 on CPU.
* Both run in batches sized by free memory, and fall back to tiles on out-of-memory.

Tiling (ComfyUI's `tiled_scale_multidim`, in tiling.py): tiles overlap and are blended with linear feathers. A
tiled pass is done with three tile shapes (square, wide, tall) and the three results averaged, which hides the
seams of any one tiling.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .models import SD15_LATENT, LatentFormat
from .tiling import Progress, TilePlan, TileProgress, tiled_apply

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

logger = logging.getLogger(__name__)

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
    def _decode_raw(module: AutoencoderKL, latent: torch.Tensor) -> torch.Tensor:
        device, dtype = _placement(module)
        return module.decode(latent.to(device=device, dtype=dtype)).sample.float()

    @staticmethod
    def _encode_raw(module: AutoencoderKL, pixels_nchw: torch.Tensor) -> torch.Tensor:
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
        tile_w, tile_h = (tile, tile) if isinstance(tile, int) else tile
        with self._ready(manager) as module:
            return self._decode_tiled(module, latent, (tile_w, tile_h), overlap, progress)

    def _decode_tiled(self, module: torch.nn.Module, latent: torch.Tensor, tile_wh: tuple[int, int], overlap: int,
                      progress: Progress | None) -> torch.Tensor:
        tile_w, tile_h = tile_wh
        # Three tilings, averaged: tall, wide, then square (ComfyUI's order, so the float sums agree).
        tilings = [(tile_h * 2, max(1, tile_w // 2)), (max(1, tile_h // 2), tile_w * 2), (tile_h, tile_w)]
        size_hw = (latent.shape[2], latent.shape[3])
        tiles = sum(TilePlan.create(size_hw, tiling, overlap).count for tiling in tilings)
        counter = TileProgress(latent.shape[0] * tiles, progress)
        out_channels = int(getattr(getattr(module, "config", None), "out_channels", 3))

        def decode_with(tiling: tuple[int, int]) -> torch.Tensor:
            return tiled_apply(latent, lambda x: self._decode_raw(module, x), tiling, overlap, self.downscale_ratio,
                               out_channels, counter.step)

        decoded = decode_with(tilings[0])
        for tiling in tilings[1:]:
            decoded = decoded + decode_with(tiling)
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
        tile_w, tile_h = (tile, tile) if isinstance(tile, int) else tile
        with self._ready(manager) as module:
            return self._encode_tiled(module, nchw, (tile_w, tile_h), overlap, progress)

    def _encode_tiled(self, module: torch.nn.Module, nchw: torch.Tensor, tile_wh: tuple[int, int], overlap: int,
                      progress: Progress | None) -> torch.Tensor:
        tile_w, tile_h = tile_wh
        # Square, wide, then tall (ComfyUI's order for encode).
        tilings = [(tile_h, tile_w), (max(1, tile_h // 2), tile_w * 2), (tile_h * 2, max(1, tile_w // 2))]
        size_hw = (nchw.shape[2], nchw.shape[3])
        tiles = sum(TilePlan.create(size_hw, tiling, overlap, self.downscale_ratio).count for tiling in tilings)
        counter = TileProgress(nchw.shape[0] * tiles, progress)

        def encode_with(tiling: tuple[int, int]) -> torch.Tensor:
            return tiled_apply(nchw, lambda x: self._encode_raw(module, x), tiling, overlap, 1 / self.downscale_ratio,
                               self.latent_channels, counter.step, align=self.downscale_ratio)

        encoded = encode_with(tilings[0])
        for tiling in tilings[1:]:
            encoded = encoded + encode_with(tiling)
        return encoded / 3.0
