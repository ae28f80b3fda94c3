"""What a CLIP link carries: the text encoder(s) of a checkpoint, and ComfyUI's way of turning a prompt into
conditioning with them.

Encoders by family (keys as ComfyUI names its clip models):
  sd1           {"l": CLIPTextModel}                 cond 768,  default layer: last, after the final LayerNorm
  sd2           {"h": CLIPTextModel[WithProjection]} cond 1024, default layer: penultimate + final LayerNorm
  sdxl          {"l": CLIPTextModel, "g": CLIPTextModelWithProjection}
                                                     cond 768 ‖ 1280, both penultimate *without* final LayerNorm
  sdxl_refiner  {"g": CLIPTextModelWithProjection}   cond 1280, penultimate without final LayerNorm
The pooled output is the final-LayerNorm state at the first EOS of the first chunk, projected by the encoder's
`text_projection` when it has one (SD2/SDXL g); for SDXL it comes from g. Loaders should give SD1 and SDXL's
clip_l a plain CLIPTextModel (ComfyUI's clip_l pooled output is unprojected). Everything is computed in float32,
whatever the storage dtype, and returned on the CPU.

The weights belong to the model memory manager (the engine's env.models): `encoders` is one nn.ModuleDict shared
by every clone, so the manager tracks and moves it as one module, and LoRA patches address its parameters by
the names "l.encoder.layers.0.self_attn.q_proj.weight", "g.text_model....".

Textual-inversion embeddings: encode(..., resolve_embedding=fn) with fn(name) -> tensor | {encoder: tensor} |
None (see nodes.diffusion.tokenizer.EmbeddingResolver). Nodes take it from the EmbeddingLibrary service when
one is registered; without one, "embedding:NAME" is encoded as plain text.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, cast

import torch

from .encoder_set import EncoderSet
from .tokenizer import (
    OPENCLIP_CHUNKS,
    SD1_CHUNKS,
    Chunk,
    ChunkFormat,
    EmbeddingResolver,
    Warn,
    empty_chunk,
    tokenize_prompt,
)

# Tokens per encoder key: a list of 77-token weighted chunks.
TokenChunks = dict[str, list[Chunk]]


@dataclass(frozen=True)
class EncoderRole:
    """How one encoder of a family frames its tokens and which hidden state it hands on."""

    chunks: ChunkFormat
    # None: the last layer after the final LayerNorm; negative n: the hidden state after layer L+n+1.
    default_layer: int | None
    # Whether a hidden state picked by index gets the final LayerNorm (SD1/SD2 yes, SDXL no).
    norm_hidden: bool


FAMILY_ENCODERS: dict[str, dict[str, EncoderRole]] = {
    "sd1": {"l": EncoderRole(SD1_CHUNKS, None, True)},
    "sd2": {"h": EncoderRole(OPENCLIP_CHUNKS, -2, True)},
    "sdxl": {"l": EncoderRole(SD1_CHUNKS, -2, False), "g": EncoderRole(OPENCLIP_CHUNKS, -2, False)},
    "sdxl_refiner": {"g": EncoderRole(OPENCLIP_CHUNKS, -2, False)},
}
POOLED_ENCODER = {"sd1": "l", "sd2": "h", "sdxl": "g", "sdxl_refiner": "g"}


# ---------------------------------------------------------------------------------------------------------------
# One transformers CLIP text encoder, run layer by layer


class _TextEmbeddings(Protocol):
    token_embedding: torch.nn.Embedding
    position_embedding: torch.nn.Embedding


class _TextEncoderStack(Protocol):
    layers: torch.nn.ModuleList


if TYPE_CHECKING:
    class TextTransformer(torch.nn.Module):
        """For type checking only: the submodules of a transformers CLIP text transformer that encoding reads
        (nn.Module declares none; to a type checker every attribute of a module is a submodule or a tensor)."""

        embeddings: _TextEmbeddings
        encoder: _TextEncoderStack
        final_layer_norm: torch.nn.LayerNorm


def text_transformer(module: torch.nn.Module) -> TextTransformer:
    """The part holding embeddings/encoder/final_layer_norm: CLIPTextModel itself in transformers >= 5 (flat), or
    its `.text_model` (CLIPTextModelWithProjection, and CLIPTextModel in older transformers)."""
    inner = getattr(module, "text_model", None)
    return cast("TextTransformer", inner if isinstance(inner, torch.nn.Module) else module)


def encoder_width(module: torch.nn.Module) -> int:
    return int(text_transformer(module).embeddings.token_embedding.embedding_dim)


def encoder_depth(module: torch.nn.Module) -> int:
    return len(text_transformer(module).encoder.layers)


def in_float32(module: torch.nn.Module) -> torch.nn.Module:
    """The module itself when its weights are float32, else a float32 copy of it. ComfyUI stores text encoders in
    half precision on accelerators but computes in float32, upcasting weights op by op; copying one layer at a
    time gives the same numbers at the cost of one layer's worth of memory."""
    if all(parameter.dtype == torch.float32 for parameter in module.parameters()):
        return module
    return copy.deepcopy(module).float()


def _token_embeddings(module: torch.nn.Module, chunks: list[Chunk], device: torch.device) -> torch.Tensor:
    """[B, 77, D] float32 input embeddings; embedding vectors (textual inversion) replace the lookup at their
    slots."""
    embedding = text_transformer(module).embeddings.token_embedding
    placeholder = 0
    ids = torch.tensor([[token if isinstance(token, int) else placeholder for token, _ in chunk] for chunk in chunks],
                       dtype=torch.long, device=device)
    embeds = embedding(ids).float()
    for row, chunk in enumerate(chunks):
        for position, (token, _) in enumerate(chunk):
            if isinstance(token, torch.Tensor):
                embeds[row, position] = token.to(device=device, dtype=torch.float32)
    return embeds


def run_text_encoder(module: torch.nn.Module, chunks: list[Chunk], layer: int | None,
                     norm_hidden: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(selected hidden state [B,77,D], last layer after final LayerNorm [B,77,D]) for a batch of chunks, float32.

    Computed from the submodules rather than `module(...)` so that embedding vectors can be injected and any
    layer read: positions are 0..76 straight from the weight (a checkpoint's position_ids buffer is ignored), the
    attention mask is causal only (no padding mask), as ComfyUI runs it.
    """
    text = text_transformer(module)
    device = text.embeddings.position_embedding.weight.device
    hidden = _token_embeddings(module, chunks, device)
    length = hidden.shape[1]
    hidden = hidden + text.embeddings.position_embedding.weight[:length].float()[None]
    causal = torch.full((length, length), torch.finfo(torch.float32).min, device=device).triu(1)[None, None]

    layers = text.encoder.layers
    # Out-of-range indices fall back to the last layer after the LayerNorm, as CLIPSetLastLayer does in ComfyUI.
    pick = None if layer is None or abs(layer) > len(layers) else len(layers) + layer
    selected = None
    for index, encoder_layer in enumerate(layers):
        output = in_float32(encoder_layer)(hidden, causal)
        hidden = output[0] if isinstance(output, tuple) else output
        if index == pick:
            selected = hidden
    final_norm = in_float32(text.final_layer_norm)
    last = final_norm(hidden)
    if selected is None:
        selected = last
    elif norm_hidden:
        selected = final_norm(selected)
    return selected, last


def _first_eos_position(chunk: Chunk, eos_id: int) -> int:
    for position, (token, _) in enumerate(chunk):
        if isinstance(token, int) and token == eos_id:
            return position
    return len(chunk) - 1


def encode_chunks(module: torch.nn.Module, chunks: list[Chunk], role: EncoderRole,
                  layer: int | None, projected: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(cond [1, 77k, D] float32, pooled [1, P] float32) for one encoder, with prompt weights applied; the pooled
    output skips the text projection when `projected` is False (ComfyUI's return_pooled="unprojected").

    A token of weight w moves away from the empty prompt's state at its position: z' = (z - z_empty)·w + z_empty
    (ComfyUI's rule; tokens of weight 1 are untouched, there is no mean re-normalisation).
    """
    if not chunks:
        chunks = [empty_chunk(role.chunks)]
    weights = torch.tensor([[w for _, w in chunk] for chunk in chunks], dtype=torch.float32)
    weighted = bool((weights != 1.0).any())
    batch = chunks + [empty_chunk(role.chunks)] if weighted else chunks
    with torch.no_grad():
        hidden, last = run_text_encoder(module, batch, layer, role.norm_hidden)
        pooled = last[0:1, _first_eos_position(chunks[0], role.chunks.eos_id)]
        projection = getattr(module, "text_projection", None)
        if projection is not None and projected:
            pooled = in_float32(projection)(pooled)
    hidden = hidden.float().cpu()
    pooled = pooled.float().cpu()
    cond = hidden[:len(chunks)]
    if weighted:
        empty = hidden[-1:]
        w = weights[:, :, None]
        cond = torch.where(w != 1.0, (cond - empty) * w + empty, cond)
    return cond.reshape(1, -1, cond.shape[-1]).clone(), pooled.clone()


# ---------------------------------------------------------------------------------------------------------------
# The CLIP object


@dataclass(frozen=True, eq=False)
class ClipModel(EncoderSet):
    """Text encoder(s) + family + clip skip. Clones share the encoder weights (one nn.ModuleDict)."""

    encoders: torch.nn.ModuleDict  # (a plain mapping of modules is accepted too, and wrapped in one)
    family: str
    # CLIPSetLastLayer's value (-1 = last, -2 = penultimate, ...); None = the family's default.
    layer_idx: int | None = None
    patches: tuple[Any, ...] = ()            # WeightPatch objects (LoRA), applied to `encoders` while encoding
    source: str = ""                         # file the weights came from
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        roles = FAMILY_ENCODERS.get(self.family)
        if roles is None:
            raise ValueError(f"unknown CLIP family {self.family!r}; known: {', '.join(FAMILY_ENCODERS)}")
        if set(self.encoders) != set(roles):
            raise ValueError(f"a {self.family} CLIP needs encoders {sorted(roles)}, got {sorted(self.encoders)}")
        if not isinstance(self.encoders, torch.nn.ModuleDict):
            object.__setattr__(self, "encoders", torch.nn.ModuleDict(dict(self.encoders)))
        if self.layer_idx is not None and self.layer_idx >= 0:
            raise ValueError(f"CLIP layer index must be negative (-1 = last layer), got {self.layer_idx}")

    @property
    def roles(self) -> dict[str, EncoderRole]:
        return FAMILY_ENCODERS[self.family]

    def layer_for(self, key: str) -> int | None:
        return self.layer_idx if self.layer_idx is not None else self.roles[key].default_layer

    # Prompt -> tokens -> conditioning -------------------------------------------------------------------------

    def tokenize(self, text: str, resolve_embedding: EmbeddingResolver | None = None,
                 warn: Warn | None = None) -> TokenChunks:
        """The weighted 77-token chunks of a prompt for each encoder."""
        return {key: tokenize_prompt(text, role.chunks, key, encoder_width(self.encoders[key]),
                                     resolve_embedding, warn)
                for key, role in self.roles.items()}

    def empty_tokens(self) -> TokenChunks:
        return {key: [empty_chunk(role.chunks)] for key, role in self.roles.items()}

    def encode_tokens(self, tokens: TokenChunks, manager: Any = None,
                      projected_pooled: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(cond [1, 77k, D], pooled [1, P]) on the CPU in float32 (pooled without the text projection when
        `projected_pooled` is False)."""
        outputs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        with self.prepared(manager) as modules:
            for key, role in self.roles.items():
                outputs[key] = encode_chunks(modules[key], tokens[key], role, self.layer_for(key), projected_pooled)
        pooled = outputs[POOLED_ENCODER[self.family]][1]
        if self.family == "sdxl":
            cond_l, cond_g = outputs["l"][0], outputs["g"][0]
            shared = min(cond_l.shape[1], cond_g.shape[1])
            return torch.cat([cond_l[:, :shared], cond_g[:, :shared]], dim=-1), pooled
        return next(iter(outputs.values()))[0], pooled

    def encode(self, text: str, resolve_embedding: EmbeddingResolver | None = None, manager: Any = None,
               warn: Warn | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_tokens(self.tokenize(text, resolve_embedding, warn), manager)


def pad_token_chunks(tokens: TokenChunks, empty: TokenChunks) -> TokenChunks:
    """Give every encoder the same number of chunks by appending empty-prompt chunks (CLIPTextEncodeSDXL, where
    clip_l and clip_g get different prompts)."""
    count = max(len(chunks) for chunks in tokens.values())
    return {key: chunks + empty[key] * (count - len(chunks)) for key, chunks in tokens.items()}
