"""The text encoders of AuraFlow (Pile-T5-XL) and Chroma (T5-XXL), as ComfyUI's aura_t5.py / pixart_t5.py use them.

* Chroma (CLIPLoader type "chroma", ComfyUI's PixArt T5): the prompt's T5 tokens and the end token, no minimum
  length and no padding (unless T5TokenizerOptions asks for min_length / min_padding), no attention mask, no
  pooled output. The T5 tokenizer is found as for Flux (nodes.diffusion.t5: `t5_tokenizer/` beside the file).
* AuraFlow (Pile-T5-XL, a UMT5-style encoder: every layer has its own relative-position bias; ComfyUI loads it
  with any CLIPLoader type and from `text_encoders.pile_t5xl.transformer.` in AuraFlow checkpoints): tokens end
  with id 2 and are padded with id 1 to at least 256; the attention mask covers the tokens up to the end token and
  the padded positions of the output are zeroed. Its SentencePiece vocabulary (LLaMA's, not T5's) is user-provided
  as `pile_t5_tokenizer/tokenizer.json` (or spiece.model) in the same folders the T5 tokenizer is looked for in.

Token weights follow ComfyUI's rule z' = (z − z_empty)·w + z_empty, z_empty the output for the empty prompt of the
same length.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch

from .family_clip import FamilyClip
from .flow import TOKENIZER_OPTIONS
from .offline import ensure_offline
from .t5 import (
    encode_t5_weighted,
    find_t5_prefix,
    find_t5_tokenizer,
    t5_config,
    t5_tokenize,
    t5_weights,
    tokenizer_search_dirs,
)
from .tokenizer import apply_token_weights

PILE_T5_PREFIXES = ("text_encoders.pile_t5xl.transformer.", "text_encoders.pile_t5xl.", "")
PILE_END_ID, PILE_PAD_ID, PILE_MIN_LENGTH = 2, 1, 256
PILE_TOKENIZER_FOLDER = "pile_t5_tokenizer"
ENCODER_KEY = {"auraflow": "pile_t5xl", "chroma": "t5xxl"}
CHROMA_MIN_LENGTH = 1


def find_pile_t5_prefix(state: Mapping[str, Any]) -> str | None:
    """Where a UMT5-style encoder (a relative-position bias in layer 1 too) sits in the weights, or None."""
    for prefix in PILE_T5_PREFIXES:
        if f"{prefix}encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight" in state:
            return prefix
    return None


def file_holds_pile_t5(path: Path) -> bool:
    """Whether a .safetensors text-encoder file is a Pile-T5 (read from its key names only)."""
    if path.suffix.lower() not in (".safetensors", ".sft"):
        return False
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return find_pile_t5_prefix(dict.fromkeys(handle.keys())) is not None
    except (OSError, ValueError, RuntimeError, SafetensorError):  # SafetensorError is a bare Exception
        return False  # the regular loader reports the unreadable file, naming the node, input and file


def build_pile_t5(state: Mapping[str, torch.Tensor], prefix: str, dtype: torch.dtype, what: str) -> torch.nn.Module:
    ensure_offline()
    from transformers import UMT5Config, UMT5EncoderModel

    from .checkpoint import _materialize

    config = t5_config(state, prefix)
    with torch.device("meta"):
        model = UMT5EncoderModel(UMT5Config(**config, pad_token_id=PILE_PAD_ID, eos_token_id=PILE_END_ID))
    return _materialize(model, t5_weights(state, prefix), dtype, what)


def _as_weighted(given: Any) -> list[tuple[Any, float]]:
    if isinstance(given, torch.Tensor):
        return [(int(t), 1.0) for t in given.reshape(-1)]
    return [item if isinstance(item, tuple) else (int(item), 1.0) for item in given]


def _run_masked(module: Any, tokens: Sequence[tuple[Any, float]], mask: torch.Tensor) -> torch.Tensor:
    embedding = module.get_input_embeddings()
    ids = torch.tensor([[t if isinstance(t, int) else PILE_PAD_ID for t, _ in tokens]])
    with torch.no_grad():
        embeds = embedding(ids.to(embedding.weight.device)).clone()
        for position, (token, _) in enumerate(tokens):
            if not isinstance(token, int):
                embeds[0, position] = token.to(embeds)
        out = module(inputs_embeds=embeds, attention_mask=mask.to(embeds.device)).last_hidden_state
    return out.float().cpu() * mask[..., None].float()


def encode_pile_t5(module: torch.nn.Module, tokens: Sequence[tuple[Any, float]]) -> torch.Tensor:
    """AuraFlow's conditioning [1, T, D]: masked after the end token, padded positions zeroed, weights applied."""
    tokens = list(tokens) or [(PILE_END_ID, 1.0)]
    end = next((i for i, (t, _) in enumerate(tokens) if isinstance(t, int) and t == PILE_END_ID), len(tokens) - 1)
    mask = torch.zeros(1, len(tokens), dtype=torch.long)
    mask[0, :end + 1] = 1

    def encode_empty() -> torch.Tensor:
        empty_mask = torch.zeros_like(mask)
        empty_mask[0, 0] = 1
        return _run_masked(module, [(PILE_END_ID, 1.0)] + [(PILE_PAD_ID, 1.0)] * (len(tokens) - 1), empty_mask)

    return apply_token_weights(_run_masked(module, tokens, mask), tokens, encode_empty)


@dataclass(frozen=True, eq=False)
class T5FamilyClip(FamilyClip):
    """A CLIP link of one T5 encoder: "pile_t5xl" for AuraFlow, "t5xxl" for Chroma."""

    def __post_init__(self) -> None:
        if self.family not in ENCODER_KEY or set(self.encoders) != {ENCODER_KEY[self.family]}:
            raise ValueError(f"a T5-only CLIP is auraflow (pile_t5xl) or chroma (t5xxl); got {self.family} with "
                             f"{sorted(self.encoders)}")

    def tokenize(self, text: str, resolve_embedding: Any = None, warn: Any = None) -> dict[str, Any]:
        key = ENCODER_KEY[self.family]
        options = self.options.get(TOKENIZER_OPTIONS) or {}
        width = cast(Any, self.encoders[key]).get_input_embeddings().weight.shape[1]
        if self.family == "chroma":
            min_length = int(options.get("t5xxl_min_length", CHROMA_MIN_LENGTH))
            min_padding = int(options.get("t5xxl_min_padding", 0))
            return {key: t5_tokenize(text, find_t5_tokenizer(self.t5_tokenizer_dirs), min_length, min_padding,
                                     width, resolve_embedding, warn)}
        tokenizer = find_t5_tokenizer(self.t5_tokenizer_dirs)
        tokens = t5_tokenize(text, dataclasses.replace(tokenizer, eos_id=PILE_END_ID), 0, 0, width,
                             resolve_embedding, warn)
        return {key: tokens + [(PILE_PAD_ID, 1.0)] * max(0, PILE_MIN_LENGTH - len(tokens))}

    def encode_tokens(self, tokens: Mapping[str, Any], manager: Any = None) -> tuple[torch.Tensor, Any]:
        """(cond [1, T, D] float32 on the CPU, no pooled output)."""
        key = ENCODER_KEY[self.family]
        given = tokens.get(key)
        with self.prepared(manager) as modules:
            if self.family == "chroma":
                return encode_t5_weighted(modules[key], _as_weighted(given if given is not None else [1])), None
            if given is None:  # the empty prompt
                given = [PILE_END_ID] + [PILE_PAD_ID] * (PILE_MIN_LENGTH - 1)
            return encode_pile_t5(modules[key], _as_weighted(given)), None


def pile_tokenizer_dirs(path: Path) -> tuple[Path, ...]:
    return tuple(folder.parent / PILE_TOKENIZER_FOLDER for folder in tokenizer_search_dirs(path))


def load_t5_family_clip(paths: list[Path], clip_type: str, dtype: torch.dtype) -> T5FamilyClip:
    """CLIPLoader for a Pile-T5-XL file (AuraFlow; any type, as ComfyUI) or type "chroma" with a T5-XXL file."""
    from .checkpoint import ModelFileError, read_state_dict
    from .family_clip import build_t5

    if len(paths) != 1:
        raise ModelFileError(f"{', '.join(p.name for p in paths)}: AuraFlow and Chroma take one T5 file")
    path = paths[0]
    state = read_state_dict(path)
    pile_prefix = find_pile_t5_prefix(state)
    if pile_prefix is not None:
        return T5FamilyClip(encoders=torch.nn.ModuleDict({"pile_t5xl": build_pile_t5(state, pile_prefix, dtype,
                                                                                      path.name)}),
                            family="auraflow", source=str(path), t5_tokenizer_dirs=pile_tokenizer_dirs(path))
    prefix = find_t5_prefix(state)
    if prefix is None:
        raise ModelFileError(f"{path.name}: a {clip_type} CLIP needs a T5-XXL encoder file; no T5 encoder found")
    return T5FamilyClip(encoders=torch.nn.ModuleDict({"t5xxl": build_t5(state, prefix, dtype, path.name)}),
                        family="chroma", source=str(path), t5_tokenizer_dirs=tokenizer_search_dirs(path))


def checkpoint_clip(state: Mapping[str, torch.Tensor], family: str, dtype: torch.dtype,
                    path: Path) -> T5FamilyClip | None:
    """The T5 encoder an all-in-one AuraFlow (text_encoders.pile_t5xl.transformer.) or Chroma
    (text_encoders.t5xxl.transformer.) file carries, or None."""
    from .family_clip import build_t5

    if family == "auraflow":
        prefix = PILE_T5_PREFIXES[0]
        if find_pile_t5_prefix(state) != prefix:
            return None
        encoder = build_pile_t5(state, prefix, dtype, f"{path.name} (Pile-T5-XL)")
        return T5FamilyClip(encoders=torch.nn.ModuleDict({"pile_t5xl": encoder}), family=family,
                            source=str(path), t5_tokenizer_dirs=pile_tokenizer_dirs(path))
    prefix = "text_encoders.t5xxl.transformer."
    if find_t5_prefix(state) != prefix:
        return None
    return T5FamilyClip(encoders=torch.nn.ModuleDict({"t5xxl": build_t5(state, prefix, dtype,
                                                                        f"{path.name} (T5-XXL)")}),
                        family=family, source=str(path), t5_tokenizer_dirs=tokenizer_search_dirs(path))
