"""Qwen2.5-VL's vision tower as ComfyUI 0.3.64 runs it for Qwen-Image Edit (comfy/text_encoders/qwen_vl.py, llama.py).

The network is transformers' Qwen2_5_VisionTransformerPretrainedModel built from the encoder file's `visual.*`
weights. ComfyUI fixes what the shapes cannot tell: 16 heads, full attention in blocks 7/15/23/31, windows of
112 pixels. Around it, ComfyUI's numerics:
* preprocessing: the first image of the batch, bilinearly resized (no antialias) to sides that are multiples of
  28 (round; shrunk or grown to stay within 3136 ... 12845056 pixels), normalised with CLIP's mean and std, cut
  into 14x14 patches, each repeated twice in time (temporal patch 2), ordered by 2x2 merge groups;
* the merged vision tokens are returned in the window order the blocks ran in: unlike the reference model
  (and transformers, which restores raster order), ComfyUI 0.3.64 does not undo the window permutation, so for
  images more than 112 pixels wide or tall its token order differs from diffusers';
* multimodal rotary positions (M-RoPE): text before an image counts 0, 1, ...; the image's tokens share the
  temporal position p (the next text position) and take p + row, p + column over the merged grid; the text after
  it resumes at p + max(rows, columns). This is transformers' get_rope_index for single-frame images.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .offline import ensure_offline

PATCH = 14
TEMPORAL_PATCH = 2
MERGE = 2
WINDOW = 112                      # pixels
HEADS = 16                        # ComfyUI's Qwen2VLVisionTransformer: fixed, not in the weights' shapes
FULL_ATTENTION_BLOCKS = (7, 15, 23, 31)
MIN_PIXELS, MAX_PIXELS = 3136, 12845056
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class VisionSpan:
    """Where an image's merged tokens sit in the prompt, and its patch grid (before merging)."""

    start: int
    size: int
    grid_h: int
    grid_w: int


def vision_prefix(text_prefix: str) -> str:
    """Where the vision tower's weights sit beside a language model found under `text_prefix`."""
    if text_prefix.endswith("language_model."):
        return text_prefix[: -len("language_model.")] + "visual."
    return text_prefix[: -len("model.")] + "visual."


def vision_config(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, Any]:
    """Qwen2_5_VLVisionConfig arguments from the tensor shapes plus ComfyUI's fixed choices."""
    hidden, channels, temporal, patch, _ = state[f"{prefix}patch_embed.proj.weight"].shape
    merged_width = state[f"{prefix}merger.mlp.0.weight"].shape[0]
    merge = math.isqrt(merged_width // hidden)
    if hidden % HEADS or merge * merge * hidden != merged_width:
        raise ValueError(f"a Qwen2.5-VL vision tower {hidden} wide does not split into {HEADS} heads / 2x2 merges")
    depth = len({m.group(1) for key in state if (m := re.match(re.escape(prefix) + r"blocks\.(\d+)\.", key))})
    return {"depth": depth, "hidden_size": int(hidden), "num_heads": HEADS, "in_channels": int(channels),
            "intermediate_size": int(state[f"{prefix}blocks.0.mlp.gate_proj.weight"].shape[0]),
            "out_hidden_size": int(state[f"{prefix}merger.mlp.2.weight"].shape[0]), "patch_size": int(patch),
            "temporal_patch_size": int(temporal), "spatial_merge_size": int(merge), "window_size": WINDOW,
            "fullatt_block_indexes": list(FULL_ATTENTION_BLOCKS), "hidden_act": "silu"}


def has_vision_tower(state: Mapping[str, torch.Tensor], prefix: str) -> bool:
    return f"{prefix}patch_embed.proj.weight" in state and f"{prefix}merger.mlp.2.weight" in state


def build_vision_model(state: Mapping[str, torch.Tensor], prefix: str, dtype: torch.dtype, what: str) \
        -> torch.nn.Module:
    ensure_offline()
    from transformers import Qwen2_5_VisionTransformerPretrainedModel, Qwen2_5_VLVisionConfig

    from .checkpoint import _materialize

    config = Qwen2_5_VLVisionConfig(**vision_config(state, prefix))
    with torch.device("meta"):
        model = Qwen2_5_VisionTransformerPretrainedModel(config)
    with torch.device("cpu"):  # the rotary frequencies are non-persistent buffers: compute them for real
        model.rotary_pos_emb = type(model.rotary_pos_emb)(config)
    weights = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
    return _materialize(model, weights, dtype, what)


def resized_side_lengths(height: int, width: int) -> tuple[int, int]:
    """ComfyUI's (and Qwen2-VL's smart_resize) target size: multiples of 28 within the pixel budget."""
    factor = PATCH * MERGE
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > MAX_PIXELS:
        beta = math.sqrt(height * width / MAX_PIXELS)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < MIN_PIXELS:
        beta = math.sqrt(MIN_PIXELS / (height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def merged_token_count(height: int, width: int) -> int:
    h_bar, w_bar = resized_side_lengths(height, width)
    return (h_bar // PATCH) * (w_bar // PATCH) // (MERGE * MERGE)


def image_patches(image: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """IMAGE [B, H, W, C] -> (patches [grid_h·grid_w, 3·2·14·14] float32, (grid_h, grid_w)); only the first
    image of the batch is used, as ComfyUI does."""
    if image.ndim != 4 or image.shape[-1] < 3:
        raise ValueError(f"expected an IMAGE [B, H, W, 3], got shape {tuple(image.shape)}")
    pixels = image[0, :, :, :3].movedim(-1, 0).float()
    h_bar, w_bar = resized_side_lengths(pixels.shape[1], pixels.shape[2])
    pixels = F.interpolate(pixels[None], size=(h_bar, w_bar), mode="bilinear", align_corners=False)[0]
    mean = torch.tensor(IMAGE_MEAN, dtype=pixels.dtype, device=pixels.device)[:, None, None]
    std = torch.tensor(IMAGE_STD, dtype=pixels.dtype, device=pixels.device)[:, None, None]
    pixels = (pixels - mean) / std
    grid_h, grid_w = h_bar // PATCH, w_bar // PATCH
    frames = pixels[None].repeat(TEMPORAL_PATCH, 1, 1, 1)  # [T, C, H, W]: one still frame, twice
    patches = frames.reshape(TEMPORAL_PATCH, 3, grid_h // MERGE, MERGE, PATCH, grid_w // MERGE, MERGE, PATCH)
    patches = patches.permute(2, 5, 3, 6, 1, 0, 4, 7)  # merge groups, then pixels of a patch (C, T, row, col)
    return patches.reshape(grid_h * grid_w, 3 * TEMPORAL_PATCH * PATCH * PATCH), (grid_h, grid_w)


def window_order(grid_h: int, grid_w: int) -> torch.Tensor:
    """The merged tokens' order as the windowed blocks see them: window by window (4x4 merged tokens, padded at
    the bottom/right edges), row-major inside each."""
    rows, cols = grid_h // MERGE, grid_w // MERGE
    size = WINDOW // MERGE // PATCH
    index = torch.arange(rows * cols).reshape(rows, cols)
    pad_h, pad_w = size - rows % size, size - cols % size
    padded = F.pad(index, (0, pad_w, 0, pad_h), value=-1)
    windows = padded.reshape((rows + pad_h) // size, size, (cols + pad_w) // size, size).permute(0, 2, 1, 3)
    flat = windows.reshape(-1)
    return flat[flat >= 0]


def encode_image(visual: torch.nn.Module, image: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """(merged vision tokens [N, D] in ComfyUI's window order, patch grid (h, w))."""
    patches, (grid_h, grid_w) = image_patches(image)
    device = next(visual.parameters()).device
    grid = torch.tensor([[1, grid_h, grid_w]], device=device)
    tokens = visual(patches.to(device), grid_thw=grid).pooler_output  # raster order
    return tokens[window_order(grid_h, grid_w).to(device)], (grid_h, grid_w)


def rope_positions(length: int, spans: list[VisionSpan]) -> torch.Tensor:
    """ComfyUI's M-RoPE position ids [3, length] (temporal, row, column) for a prompt with images at `spans`."""
    positions = torch.arange(length).repeat(3, 1)
    offset = 0  # position minus index, after the images so far
    for span in spans:
        start, end = span.start, span.start + span.size
        base = start + offset
        longest = max(1, span.grid_h, span.grid_w) // MERGE
        positions[:, end:] = torch.arange(base + longest, base + longest + length - end)
        cols = span.grid_w // MERGE
        index = torch.arange(span.size)
        positions[0, start:end] = base
        positions[1, start:end] = base + index // cols
        positions[2, start:end] = base + index % cols
        offset += longest - span.size
    return positions
