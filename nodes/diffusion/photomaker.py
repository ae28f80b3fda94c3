"""PhotoMaker (ComfyUI's PHOTOMAKER, models/photomaker): an ID encoder that fuses a face image into the embedding
of the class word in front of the trigger word "photomaker" of an SDXL prompt.

The file (`id_encoder` of the published .bin, or the same tensors flat) holds a CLIP ViT-L vision tower with its
visual_projection (768), a second projection of the pooled image feature (visual_projection_2, 1280) and a fuse
module over [class-word embedding, ID embedding]: MLP(2·D → D, no residual) added to the word embedding, then
MLP(D → D, residual) and a layer norm; D is the SDXL conditioning width (2048). As in ComfyUI, one ID image (the
first of the batch) is fused into one token: position n − 1 of the first chunk when the trigger is the n-th
space-separated word (the class word in front of it, when words are single tokens).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from .checkpoint import ModelFileError, _materialize, read_state_dict
from .clip import ClipModel, encoder_width
from .clip_vision import build_clip_vision, clip_preprocess
from .tokenizer import chunk_tokens, token_groups

TRIGGER_WORD = "photomaker"
VISION_PREFIXES = ("vision_model.", "visual_projection.")


class _FuseMLP(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int, residual: bool) -> None:
        super().__init__()
        self.layernorm = nn.LayerNorm(in_dim)
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, out_dim)
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc2(nn.functional.gelu(self.fc1(self.layernorm(x))))
        return out + x if self.residual else out


class _FuseModule(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.mlp1 = _FuseMLP(2 * width, width, width, residual=False)
        self.mlp2 = _FuseMLP(width, width, width, residual=True)
        self.layer_norm = nn.LayerNorm(width)

    def forward(self, word: torch.Tensor, identity: torch.Tensor) -> torch.Tensor:
        fused = self.mlp1(torch.cat([word, identity], dim=-1)) + word
        return self.layer_norm(self.mlp2(fused))


class _IdHead(nn.Module):
    """What PhotoMaker adds to the CLIP vision tower (file names: visual_projection_2, fuse_module)."""

    def __init__(self, vision_width: int, projection_2: int, fuse_width: int) -> None:
        super().__init__()
        self.visual_projection_2 = nn.Linear(vision_width, projection_2, bias=False)
        self.fuse_module = _FuseModule(fuse_width)


class PhotoMakerIDEncoder(nn.Module):
    vision: Any  # transformers CLIPVisionModelWithProjection
    head: _IdHead

    def __init__(self, vision: nn.Module, head: _IdHead) -> None:
        super().__init__()
        self.vision = vision
        self.head = head

    def identity_embedding(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] → [B, projection + projection_2]: both projections of the pooled (post-norm CLS) feature."""
        pooled = self.vision.vision_model(pixel_values=pixels).pooler_output
        return torch.cat([self.vision.visual_projection(pooled), self.head.visual_projection_2(pooled)], dim=-1)


@dataclass(frozen=True, eq=False)
class PhotoMakerModel:
    """What a PHOTOMAKER link carries."""

    encoder: PhotoMakerIDEncoder
    image_size: int
    fuse_width: int
    source: str = ""

    def cache_nbytes(self) -> int:
        return 0  # the weights are owned (and counted) by the model memory manager

    def fuse(self, image: torch.Tensor, cond: torch.Tensor, positions: list[int], manager: Any = None) \
            -> torch.Tensor:
        """`cond` [1, tokens, D] with the rows at `positions` fused with the first image's ID embedding."""
        lease = manager.use(self.encoder) if manager is not None else contextlib.nullcontext(self.encoder)
        with torch.no_grad(), lease as encoder:
            parameter = next(encoder.parameters())
            pixels = clip_preprocess(image.to(parameter.device), self.image_size)
            identity = encoder.identity_embedding(pixels.to(parameter.dtype))[:1]
            out = cond.to(parameter.device, parameter.dtype).clone()
            for position in positions:
                out[0, position] = encoder.head.fuse_module(out[0, position:position + 1], identity)[0]
        return out.float().cpu()


def read_photomaker_state(path: Path) -> dict[str, torch.Tensor]:
    """The ID encoder's tensors: the `id_encoder` part of the published .bin (which also holds LoRA weights), or a
    flat file of the same tensors (optionally under `id_encoder.`)."""
    if path.suffix.lower() in (".bin", ".pt", ".pth", ".ckpt") and path.is_file():
        try:
            document = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # zip / pickle / truncated-file errors come in many types
            raise ModelFileError(f"{path.name}: not a readable weights file ({type(error).__name__}: {error})") \
                from error
        if isinstance(document, dict) and isinstance(document.get("id_encoder"), dict):
            return {k: v for k, v in document["id_encoder"].items() if isinstance(v, torch.Tensor)}
    state = read_state_dict(path)
    prefix = "id_encoder."
    if any(key.startswith(prefix) for key in state):
        state = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
    return state


def build_photomaker(state: Mapping[str, torch.Tensor], dtype: torch.dtype, what: str,
                     source: str = "") -> PhotoMakerModel:
    projection_2 = state.get("visual_projection_2.weight")
    fuse_norm = state.get("fuse_module.layer_norm.weight")
    if projection_2 is None or fuse_norm is None:
        raise ModelFileError(f"{what}: not a PhotoMaker ID encoder (no visual_projection_2 / fuse_module weights)")
    vision = build_clip_vision({k: v for k, v in state.items() if k.startswith(VISION_PREFIXES)}, dtype, what)
    projection_width = state["visual_projection.weight"].shape[0]
    fuse_width = fuse_norm.shape[0]
    if projection_width + projection_2.shape[0] != fuse_width:
        raise ModelFileError(f"{what}: projections of width {projection_width} + {projection_2.shape[0]} do not "
                             f"match the fuse module's width {fuse_width}")
    with torch.device("meta"):
        head = _IdHead(projection_2.shape[1], projection_2.shape[0], fuse_width)
    head_state = {k: v for k, v in state.items() if not k.startswith(VISION_PREFIXES)}
    encoder = PhotoMakerIDEncoder(vision.model, cast(_IdHead, _materialize(head, head_state, dtype, what))).eval()
    return PhotoMakerModel(encoder, vision.image_size, fuse_width, source)


def load_photomaker_file(path: str | Path, manager: Any = None) -> PhotoMakerModel:
    path = Path(path)
    dtype = manager.dtype_for("text_encoder") if manager is not None else torch.float32
    return build_photomaker(read_photomaker_state(path), dtype, path.name, str(path))


def trigger_word_number(text: str) -> int:
    """ComfyUI's index of the trigger: its 1-based position among the prompt's space-separated words, -1 if absent."""
    words = text.split(" ")
    return words.index(TRIGGER_WORD) + 1 if TRIGGER_WORD in words else -1


def tokens_without_group(clip: ClipModel, text: str, number: int, resolve_embedding: Any = None,
                         warn: Any = None) -> dict[str, list]:
    """The prompt's chunks for each encoder without token group `number` (1-based). ComfyUI 0.3.64 drops the
    tokens whose word id equals the trigger's word number, and its word ids number the tokenizer's groups (one
    per prompt-weight segment and per embedding), so in a plain prompt, which is one group, nothing is dropped."""
    tokens = {}
    for key, role in clip.roles.items():
        groups = token_groups(text, key, encoder_width(clip.encoders[key]), resolve_embedding, warn)
        if 1 <= number <= len(groups):
            groups = groups[:number - 1] + groups[number:]
        tokens[key] = chunk_tokens(groups, role.chunks)
    return tokens
