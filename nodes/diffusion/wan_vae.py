"""The Wan 2.1 VAE (Qwen-Image's autoencoder) from ComfyUI's file, used on single images.

ComfyUI's `qwen_image_vae.safetensors` / `wan_2.1_vae.safetensors` hold the original Wan names (encoder.conv1,
encoder.downsamples.*, encoder.middle.*, encoder.head.*, conv1/conv2 as the quant convs, decoder.upsamples.*);
ComfyUI recognises them by `decoder.middle.0.residual.0.gamma` (Wan 2.2's 48-channel VAE also has
`decoder.upsamples.0.upsamples.0.*`). diffusers' convert_wan_vae_to_diffusers maps the names to
AutoencoderKLQwenImage (the same network as AutoencoderKLWan). The structure is fixed (channel multipliers
1, 2, 4, 4, two residual blocks per level, temporal downsampling in the last two levels); only the base width
(96 in the real file) and the latent width (16) are read from the shapes.

The network is a video autoencoder ([B, C, T, H, W]); an image is one frame. ImageVAE wraps it with the 4-D
interface of diffusers' AutoencoderKL that nodes.diffusion.vae.VAEModel drives (encode -> latent_dist.mode(),
decode -> .sample), so every VAE node works on it unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch

from .offline import ensure_offline

WAN_VAE_MARKER = "decoder.middle.0.residual.0.gamma"
WAN22_MARKER = "decoder.upsamples.0.upsamples.0.residual.2.weight"
WAN_VAE_PREFIXES = ("", "vae.", "first_stage_model.")


class NotAWanVAE(ValueError):
    """Weights that are not a Wan 2.1 VAE this engine can build."""


def find_wan_vae_prefix(state: Mapping[str, Any]) -> str | None:
    return next((prefix for prefix in WAN_VAE_PREFIXES if prefix + WAN_VAE_MARKER in state), None)


def wan_vae_config(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """AutoencoderKLQwenImage keyword arguments from a Wan 2.1 VAE's (prefix-free) original names."""
    if WAN22_MARKER in state:
        raise NotAWanVAE("a Wan 2.2 VAE (48 latent channels) is not supported; Qwen-Image uses the Wan 2.1 VAE")
    for name in ("encoder.conv1.weight", "decoder.conv1.weight", "conv2.weight"):
        if name not in state:
            raise NotAWanVAE(f"Wan-style VAE weights without {name}")
    base_dim = int(state["encoder.conv1.weight"].shape[0])
    z_dim = int(state["conv2.weight"].shape[0])
    if z_dim != 16:
        raise NotAWanVAE(f"a Wan VAE with {z_dim} latent channels (only the 16-channel Wan 2.1 VAE is known)")
    return {"base_dim": base_dim, "z_dim": z_dim, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2,
            "attn_scales": [], "temperal_downsample": [False, True, True], "dropout": 0.0}


@dataclass(frozen=True)
class _Posterior:
    mean: torch.Tensor

    def mode(self) -> torch.Tensor:
        return self.mean


class ImageVAE(torch.nn.Module):
    """A Wan video autoencoder seen as an image autoencoder: IMAGE batches are batches of one-frame videos."""

    def __init__(self, video: Any):  # diffusers' AutoencoderKLQwenImage (diffusers models are read as Any)
        super().__init__()
        self.video = video
        self.config = SimpleNamespace(latent_channels=int(video.config.z_dim), out_channels=3, in_channels=3)

    def encode(self, pixels: torch.Tensor) -> SimpleNamespace:
        """pixels [B, 3, H, W] in -1..1 -> posterior whose mode() is the latent mean [B, 16, H/8, W/8]."""
        posterior = self.video.encode(pixels.unsqueeze(2)).latent_dist
        return SimpleNamespace(latent_dist=_Posterior(posterior.mode()[:, :, 0]))

    def decode(self, latent: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(sample=self.video.decode(latent.unsqueeze(2)).sample[:, :, 0])


def build_wan21_vae(state: Mapping[str, torch.Tensor], dtype: torch.dtype, what: str) -> ImageVAE:
    """The ImageVAE of a Wan 2.1 VAE file's tensors (any of WAN_VAE_PREFIXES)."""
    ensure_offline()
    from diffusers import AutoencoderKLQwenImage
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    from .checkpoint import _materialize

    prefix = find_wan_vae_prefix(state)
    if prefix is None:
        raise NotAWanVAE(f"no {WAN_VAE_MARKER} in the weights")
    own = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
    config = wan_vae_config(own)
    weights = convert_wan_vae_to_diffusers(own)
    with torch.device("meta"):
        video = AutoencoderKLQwenImage(**config)
    return ImageVAE(_materialize(video, weights, dtype, what))
