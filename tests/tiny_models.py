"""Tiny random SD-shaped models for tests (helpers, not tests).

    from tiny_models import write_tiny_checkpoint, tiny_components   # tests/ is on sys.path under pytest
    path = write_tiny_checkpoint(tmp_path / "sd1.safetensors", family="sd1", seed=0)
    parts = tiny_components("sdxl", seed=0)       # diffusers/transformers modules, before any conversion

Families: "sd1", "sd1_inpaint" (9 input channels), "sd2" (eps), "sd2_v" (v-prediction), "sdxl", "sdxl_refiner".
They keep each family's block layout (LDM key names, attention style, SDXL size conditioning, text encoders in
the right layouts) and shrink only the widths, so the real loader, detector and converters are exercised. Every
parameter is perturbed with seeded noise so that a mis-mapped key cannot go unnoticed. Files are a few MB (most
of it is the real 49408-token vocabulary, kept so the real tokenizer's ids work).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from latentloom.nodes.diffusion import convert  # noqa: E402

FAMILIES = ("sd1", "sd1_inpaint", "sd2", "sd2_v", "sdxl", "sdxl_refiner")
VOCAB_SIZE = 49408
TEXT_WIDTH = 32


@dataclass
class TinyComponents:
    family: str               # the model family as the loader reports it ("sd1", "sd2", "sdxl", "sdxl_refiner")
    prediction: str           # "eps" | "v"
    unet: torch.nn.Module     # diffusers UNet2DConditionModel
    vae: torch.nn.Module      # diffusers AutoencoderKL
    text_encoders: dict[str, torch.nn.Module]   # CLIP slot ("l", "h", "g") -> transformers text model


def _text_encoder(open_clip: bool, projection: bool, seed: int) -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=VOCAB_SIZE, hidden_size=TEXT_WIDTH, intermediate_size=2 * TEXT_WIDTH, num_hidden_layers=3,
        num_attention_heads=max(1, TEXT_WIDTH // 64), max_position_embeddings=77,
        hidden_act="gelu" if open_clip else "quick_gelu", projection_dim=TEXT_WIDTH,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=0 if open_clip else 1,
    )
    torch.manual_seed(seed)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def _unet(family: str, seed: int) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    if family in ("sd1", "sd1_inpaint", "sd2", "sd2_v"):
        sd2 = family.startswith("sd2")
        return UNet2DConditionModel(
            sample_size=8, in_channels=9 if family == "sd1_inpaint" else 4, out_channels=4,
            block_out_channels=(32, 32, 64, 64), layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=TEXT_WIDTH, norm_num_groups=32,
            # SD1: 8 heads; SD2: 64-wide heads, i.e. one head at these widths (see nodes.diffusion.detect).
            attention_head_dim=(1, 1, 1, 1) if sd2 else 8, use_linear_projection=sd2,
        ).eval()
    if family == "sdxl":
        return UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64), layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 1, 2), cross_attention_dim=2 * TEXT_WIDTH, norm_num_groups=32,
            attention_head_dim=(1, 1, 1), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=TEXT_WIDTH + 6 * 256,
        ).eval()
    if family == "sdxl_refiner":
        return UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64, 64), layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=1, cross_attention_dim=TEXT_WIDTH, norm_num_groups=32,
            attention_head_dim=(1, 1, 1, 1), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=TEXT_WIDTH + 5 * 256,
        ).eval()
    raise ValueError(f"unknown tiny family {family!r}; known: {', '.join(FAMILIES)}")


def _vae(scaling_factor: float, seed: int) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32, 64, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=32, scaling_factor=scaling_factor,
    ).eval()


def _perturb(module: torch.nn.Module, generator: torch.Generator, scale: float = 0.02) -> None:
    """Make every tensor distinct (default inits leave norms at exactly 1 and biases at 0)."""
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)


def tiny_components(family: str = "sd1", seed: int = 0) -> TinyComponents:
    """Random tiny diffusers/transformers components of a family, deterministic in `seed`."""
    if family not in FAMILIES:
        raise ValueError(f"unknown tiny family {family!r}; known: {', '.join(FAMILIES)}")
    with torch.random.fork_rng(devices=[]):
        unet = _unet(family, seed)
        xl = family.startswith("sdxl")
        vae = _vae(0.13025 if xl else 0.18215, seed + 1)
        if family.startswith("sd1"):
            encoders = {"l": _text_encoder(open_clip=False, projection=False, seed=seed + 2)}
        elif family.startswith("sd2"):
            encoders = {"h": _text_encoder(open_clip=True, projection=True, seed=seed + 2)}
        elif family == "sdxl":
            encoders = {"l": _text_encoder(open_clip=False, projection=False, seed=seed + 2),
                        "g": _text_encoder(open_clip=True, projection=True, seed=seed + 3)}
        else:
            encoders = {"g": _text_encoder(open_clip=True, projection=True, seed=seed + 3)}
        generator = torch.Generator().manual_seed(seed + 4)
        for module in (unet, vae, *encoders.values()):
            _perturb(module, generator)
        if family.startswith("sd2"):
            # The statistic ComfyUI reads to tell SD2 v from eps models (std > 0.09 means v); noise of 0.02
            # keeps eps models below it.
            bias = unet.up_blocks[-1].attentions[-1].transformer_blocks[0].norm1.bias
            with torch.no_grad():
                bias.copy_(torch.randn(bias.shape, generator=generator) * (0.3 if family == "sd2_v" else 0.02))
    base_family = {"sd1_inpaint": "sd1", "sd2_v": "sd2"}.get(family, family)
    return TinyComponents(base_family, "v" if family == "sd2_v" else "eps", unet, vae, encoders)


def checkpoint_state(components: TinyComponents) -> dict[str, torch.Tensor]:
    """The components as one LDM single-file state dict (written with our diffusers→LDM writer)."""
    return convert.ldm_checkpoint(components.family, components.unet, components.vae, components.text_encoders)


def save_state(state: dict[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """Write a state dict as .safetensors, or as a weights-only pickle {"state_dict": ...} for .ckpt/.pt."""
    from latentloom.nodes.diffusion.checkpoint import save_state_dict

    return save_state_dict(state, path)


def write_tiny_checkpoint(path: str | os.PathLike, family: str = "sd1", seed: int = 0) -> Path:
    """A tiny random checkpoint of `family` as a single LDM-layout file (.safetensors, .ckpt or .pt)."""
    return save_state(checkpoint_state(tiny_components(family, seed)), path)


def write_tiny_vae(path: str | os.PathLike, family: str = "sd1", seed: int = 0, ldm_names: bool = True) -> Path:
    """A stand-alone VAE file (LDM names without prefix, as distributed VAEs are, or diffusers names)."""
    vae = tiny_components(family, seed).vae.state_dict()
    return save_state(convert.vae_to_ldm(vae) if ldm_names else vae, path)


def write_tiny_unet(path: str | os.PathLike, family: str = "sd1", seed: int = 0) -> Path:
    """A stand-alone UNet file in LDM names without prefix (ComfyUI's models/unet / diffusion_models)."""
    unet = tiny_components(family, seed).unet
    return save_state(convert.unet_to_ldm(unet.state_dict(), unet.config.layers_per_block), path)


def write_tiny_text_encoder(path: str | os.PathLike, family: str = "sd1", slot: str = "l", seed: int = 0) -> Path:
    """A stand-alone text encoder file in transformers names (as models/clip files are)."""
    encoder = tiny_components(family, seed).text_encoders[slot]
    return save_state(convert.clip_to_hf_legacy(encoder.state_dict()), path)


def write_tiny_diffusers(directory: str | os.PathLike, family: str = "sd1", seed: int = 0) -> Path:
    """A diffusers-format folder (model_index.json, unet/, vae/, text_encoder[_2]/, scheduler/)."""
    directory = Path(directory)
    parts = tiny_components(family, seed)
    parts.unet.save_pretrained(directory / "unet")
    parts.vae.save_pretrained(directory / "vae")
    pipeline = {"sd1": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline",
                "sdxl": "StableDiffusionXLPipeline", "sdxl_refiner": "StableDiffusionXLImg2ImgPipeline"}
    index: dict[str, object] = {"_class_name": pipeline[parts.family], "_diffusers_version": "0.42.1",
                                "unet": ["diffusers", "UNet2DConditionModel"],
                                "vae": ["diffusers", "AutoencoderKL"],
                                "scheduler": ["diffusers", "EulerDiscreteScheduler"]}
    folders = {"sd1": [("l", "text_encoder")], "sd2": [("h", "text_encoder")],
               "sdxl": [("l", "text_encoder"), ("g", "text_encoder_2")],
               "sdxl_refiner": [("g", "text_encoder_2")]}[parts.family]
    for slot, folder in folders:
        parts.text_encoders[slot].save_pretrained(directory / folder)
        index[folder] = ["transformers", type(parts.text_encoders[slot]).__name__]
    (directory / "scheduler").mkdir(parents=True, exist_ok=True)
    (directory / "scheduler" / "scheduler_config.json").write_text(json.dumps({
        "_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
        "prediction_type": "v_prediction" if parts.prediction == "v" else "epsilon",
    }))
    (directory / "model_index.json").write_text(json.dumps(index, indent=2))
    return directory
