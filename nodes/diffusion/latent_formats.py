"""Latent formats of the 16-channel families (ComfyUI's comfy/latent_formats.py values).

The diffusion transformer works on (latent − shift_factor) · scale_factor of the raw VAE latent; LatentFormat
(nodes.diffusion.models) already applies the shift in process_in / process_out. The RGB factors give the live
preview (one row per latent channel, columns R, G, B, plus a bias).
"""

from __future__ import annotations

from .models import SDXL_LATENT, ChannelLatentFormat, LatentFormat

SD3_LATENT = LatentFormat(
    channels=16, scale_factor=1.5305, shift_factor=0.0609,
    rgb_factors=(
        (-0.0922, -0.0175, 0.0749), (0.0311, 0.0633, 0.0954), (0.1994, 0.0927, 0.0458), (0.0856, 0.0339, 0.0902),
        (0.0587, 0.0272, -0.0496), (-0.0006, 0.1104, 0.0309), (0.0978, 0.0306, 0.0427), (-0.0042, 0.1038, 0.1358),
        (-0.0194, 0.0020, 0.0669), (-0.0488, 0.0130, -0.0268), (0.0922, 0.0988, 0.0951), (-0.0278, 0.0524, -0.0542),
        (0.0332, 0.0456, 0.0895), (-0.0069, -0.0030, -0.0810), (-0.0596, -0.0465, -0.0293),
        (-0.1448, -0.1463, -0.1189),
    ),
    rgb_bias=(0.2394, 0.2135, 0.1925),
)

FLUX_LATENT = LatentFormat(
    channels=16, scale_factor=0.3611, shift_factor=0.1159,
    rgb_factors=(
        (-0.0346, 0.0244, 0.0681), (0.0034, 0.0210, 0.0687), (0.0275, -0.0668, -0.0433), (-0.0174, 0.0160, 0.0617),
        (0.0859, 0.0721, 0.0329), (0.0004, 0.0383, 0.0115), (0.0405, 0.0861, 0.0915), (-0.0236, -0.0185, -0.0259),
        (-0.0245, 0.0250, 0.1180), (0.1008, 0.0755, -0.0421), (-0.0515, 0.0201, 0.0011), (0.0428, -0.0012, -0.0036),
        (0.0817, 0.0765, 0.0749), (-0.1264, -0.0522, -0.1103), (-0.0280, -0.0881, -0.0499),
        (-0.1262, -0.0982, -0.0778),
    ),
    rgb_bias=(-0.0329, -0.0718, -0.0851),
)

# Wan 2.1's VAE latent (Qwen-Image): normalised per channel, scale 1. Images only here, so the 4-D [B, C, H, W]
# form; Wan's video latents add a time axis.
WAN21_LATENT = ChannelLatentFormat(
    channels=16, scale_factor=1.0,
    latents_mean=(-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                  0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921),
    latents_std=(2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                 3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160),
    rgb_factors=(
        (-0.1299, -0.1692, 0.2932), (0.0671, 0.0406, 0.0442), (0.3568, 0.2548, 0.1747), (0.0372, 0.2344, 0.1420),
        (0.0313, 0.0189, -0.0328), (0.0296, -0.0956, -0.0665), (-0.3477, -0.4059, -0.2925), (0.0166, 0.1902, 0.1975),
        (-0.0412, 0.0267, -0.1364), (-0.1293, 0.0740, 0.1636), (0.0680, 0.3019, 0.1128), (0.0032, 0.0581, 0.0639),
        (-0.1251, 0.0927, 0.1699), (0.0060, -0.0633, 0.0005), (0.3477, 0.2275, 0.2950), (0.1984, 0.0913, 0.1861),
    ),
    rgb_bias=(-0.1835, -0.0868, -0.3360),
)

FAMILY_LATENT_FORMATS: dict[str, LatentFormat] = {"sd3": SD3_LATENT, "flux": FLUX_LATENT,
                                                  "qwen_image": WAN21_LATENT,
                                                  "auraflow": SDXL_LATENT,  # AuraFlow uses SDXL's 4-channel VAE
                                                  "chroma": FLUX_LATENT,
                                                  "lumina2": FLUX_LATENT,
                                                  "hidream": FLUX_LATENT}


def latent_format_for_family(family: str) -> LatentFormat:
    """The latent format of a transformer family ("sd3", "flux", "qwen_image"); KeyError for others."""
    return FAMILY_LATENT_FORMATS[family]


def sixteen_channel_format(file_name: str) -> LatentFormat:
    """SD3 and Flux VAEs have identical shapes (16 latent channels, no quant convs); only the file name tells them
    apart. The format only affects previews: latents between nodes are the VAE's raw, unscaled ones."""
    name = file_name.lower()
    return FLUX_LATENT if "flux" in name or name.startswith("ae.") else SD3_LATENT
