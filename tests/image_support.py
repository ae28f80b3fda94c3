"""Helpers for the VAE / latent / image node tests (not tests): a tiny random VAE (the run context: node_context)."""

from __future__ import annotations

import os
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def tiny_autoencoder(seed: int = 0) -> torch.nn.Module:
    """SD-shaped AutoencoderKL (4 blocks => /8, 4 latent channels) with random weights, a few hundred kB."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32, 64, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=32,
    ).eval()


class LocalAutoencoder(torch.nn.Module):
    """A stand-in whose outputs depend only on nearby inputs (no normalisation statistics, no attention), so
    tiling can be compared exactly. kernel=1: pointwise in latent cells; kernel=3: one latent cell of context."""

    def __init__(self, kernel: int = 1):
        super().__init__()
        self.config = SimpleNamespace(latent_channels=4, out_channels=3)
        with torch.random.fork_rng():  # fixed weights without disturbing the caller's random stream
            torch.manual_seed(1)
            self.to_pixels = torch.nn.Conv2d(4, 3, kernel, padding=kernel // 2)
            self.to_latent = torch.nn.Conv2d(3, 4, 1)
        self.decode_sizes: list[tuple[int, int]] = []
        self.encode_sizes: list[tuple[int, int]] = []

    def decode(self, latent):
        self.decode_sizes.append(tuple(latent.shape[-2:]))
        return SimpleNamespace(sample=F.interpolate(self.to_pixels(latent), scale_factor=8, mode="nearest"))

    def encode(self, pixels):
        self.encode_sizes.append(tuple(pixels.shape[-2:]))
        mean = self.to_latent(F.avg_pool2d(pixels, 8))
        return SimpleNamespace(latent_dist=SimpleNamespace(mode=lambda: mean))
