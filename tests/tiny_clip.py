"""Tiny random CLIP text encoders and CLIP objects for the text-encoding tests (helpers, not tests)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from latentloom.nodes.diffusion.clip import ClipModel  # noqa: E402

VOCAB_SIZE = 49408
LAYERS = 3
# Widths of the tiny encoders standing in for CLIP-L (768), OpenCLIP-H (1024) and OpenCLIP-G (1280).
WIDTH = {"l": 32, "h": 40, "g": 48}
PROJECTION = {"h": 24, "g": 40}


def text_encoder(key: str, seed: int, projection: bool = False) -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    width = WIDTH[key]
    config = CLIPTextConfig(
        vocab_size=VOCAB_SIZE, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=LAYERS,
        num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu" if key == "l" else "gelu",
        projection_dim=PROJECTION.get(key, width), bos_token_id=49406, eos_token_id=49407,
    )
    torch.manual_seed(seed)
    model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()
    # Default init leaves the LayerNorms at exactly 1/0; perturb them so a missing or extra norm shows.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "layer_norm" in name:
                parameter.add_(torch.randn_like(parameter) * 0.2)
    return model


def tiny_clip(family: str, seed: int = 0) -> ClipModel:
    if family == "sd1":
        encoders = {"l": text_encoder("l", seed)}
    elif family == "sd2":
        encoders = {"h": text_encoder("h", seed, projection=True)}
    elif family == "sdxl":
        encoders = {"l": text_encoder("l", seed), "g": text_encoder("g", seed + 1, projection=True)}
    elif family == "sdxl_refiner":
        encoders = {"g": text_encoder("g", seed + 1, projection=True)}
    else:
        raise ValueError(family)
    return ClipModel(encoders, family)
