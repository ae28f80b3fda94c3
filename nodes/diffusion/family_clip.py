"""What a CLIP link carries for SD3 / SD3.5 and Flux: CLIP-L, CLIP-G and T5-XXL encoders combined as ComfyUI's
SD3 and Flux clip models combine them.

SD3: CLIP-L and CLIP-G penultimate hidden states (no final LayerNorm) side by side (768 + 1280), zero-padded to
T5's 4096 width, then T5's tokens appended along the sequence; pooled = [CLIP-L pooled (unprojected) ‖ CLIP-G
pooled (projected)], zeros when no CLIP is loaded. Flux: the conditioning is T5's output, the pooled vector
CLIP-L's final-LayerNorm EOS state (unprojected).

Tokens: {"l": chunks, "g": chunks} as the SD CLIPs make them, plus "t5xxl": T5's weighted tokens
[(id or vector, weight), ...] (nodes.diffusion.t5.t5_tokenize; plain ids as a list of ints or a [1, T] tensor
are accepted too). The T5 tokenizer is a user-provided file found beside the T5 file (t5.tokenizer_search_dirs);
without it `tokenize` raises TokenizerUnavailable naming the folders it looked in.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

from .clip import EncoderRole, encode_chunks
from .encoder_set import EncoderSet
from .flow import TOKENIZER_OPTIONS
from .t5 import (
    TokenizerUnavailable,  # noqa: F401 (re-exported: callers catch it from this module)
    encode_t5_weighted,
    find_t5_prefix,
    find_t5_tokenizer,
    t5_config,
    t5_encoder_model,
    t5_tokenize,
    t5_weights,
    tokenizer_search_dirs,
)
from .tokenizer import OPENCLIP_CHUNKS, SD1_CHUNKS, empty_chunk, tokenize_prompt

if TYPE_CHECKING:
    from .gemma_text import Lumina2Clip

T5_WIDTH_SD3 = 4096
# ComfyUI's T5XXLTokenizer min_length per family (sd3_clip.py: 77, flux.py: 256); no maximum, no chunks.
T5_MIN_LENGTH = {"sd3": 77, "flux": 256}
ROLES: dict[str, dict[str, EncoderRole]] = {
    "sd3": {"l": EncoderRole(SD1_CHUNKS, -2, False), "g": EncoderRole(OPENCLIP_CHUNKS, -2, False)},
    "flux": {"l": EncoderRole(SD1_CHUNKS, None, True)},
}
ALLOWED = {"sd3": {"l", "g", "t5xxl"}, "flux": {"l", "t5xxl"}}
CHECKPOINT_PREFIXES = {"l": "text_encoders.clip_l.transformer.", "g": "text_encoders.clip_g.transformer.",
                       "t5xxl": "text_encoders.t5xxl.transformer."}


@dataclass(frozen=True, eq=False)
class FamilyClip(EncoderSet):
    """Text encoders of an SD3 / Flux clip ("l", "g", "t5xxl", any subset ComfyUI accepts) + family."""

    encoders: torch.nn.ModuleDict
    family: str                              # "sd3" | "flux"
    layer_idx: int | None = None
    patches: tuple[Any, ...] = ()
    source: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    t5_tokenizer_dirs: tuple[Path, ...] = ()  # where the T5 tokenizer is looked for (beside the T5 file)

    def __post_init__(self) -> None:
        if self.family not in ALLOWED:
            raise ValueError(f"unknown transformer-family CLIP {self.family!r}; known: {', '.join(ALLOWED)}")
        extra = set(self.encoders) - ALLOWED[self.family]
        if extra or not self.encoders:
            raise ValueError(f"a {self.family} CLIP takes encoders {sorted(ALLOWED[self.family])}, "
                             f"got {sorted(self.encoders)}")

    def _clip_roles(self) -> dict[str, EncoderRole]:
        return {key: role for key, role in ROLES[self.family].items() if key in self.encoders}

    def tokenize(self, text: str, resolve_embedding: Any = None, warn: Any = None) -> dict[str, Any]:
        from .clip import encoder_width

        tokens: dict[str, Any] = {key: tokenize_prompt(text, role.chunks, key, encoder_width(self.encoders[key]),
                                                       resolve_embedding, warn)
                                  for key, role in self._clip_roles().items()}
        if "t5xxl" in self.encoders:
            options = self.options.get(TOKENIZER_OPTIONS) or {}
            min_length = int(options.get("t5xxl_min_length", T5_MIN_LENGTH[self.family]))
            min_padding = int(options.get("t5xxl_min_padding", 0))
            width = cast(Any, self.encoders["t5xxl"]).get_input_embeddings().weight.shape[1]
            tokens["t5xxl"] = t5_tokenize(text, find_t5_tokenizer(self.t5_tokenizer_dirs), min_length, min_padding,
                                          width, resolve_embedding, warn)
        return tokens

    def encode_tokens(self, tokens: Mapping[str, Any], manager: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(cond [1, T, D], pooled [1, P]) float32 on the CPU."""
        outputs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        t5_out = None
        clip_roles = self._clip_roles()
        if all(key in tokens and not tokens[key] for key in ("l", "g")):
            clip_roles = {}  # ComfyUI's SD3 clip encodes no CLIP part when both token lists are empty
        with self.prepared(manager) as modules:
            for key, role in clip_roles.items():
                chunks = tokens.get(key) or [empty_chunk(role.chunks)]
                layer = self.layer_idx if self.layer_idx is not None else role.default_layer
                outputs[key] = encode_chunks(modules[key], chunks, role, layer, projected=key == "g")
            if "t5xxl" in modules:
                t5_out = encode_t5_weighted(modules["t5xxl"], self._t5_tokens(tokens))
        if self.family == "flux":
            if t5_out is None:
                raise ValueError("a Flux CLIP needs its T5-XXL encoder for the conditioning")
            pooled = outputs["l"][1] if "l" in outputs else torch.zeros(1, 768)
            return t5_out, pooled
        return self._combine_sd3(outputs, t5_out)

    def _t5_tokens(self, tokens: Mapping[str, Any]) -> list[tuple[Any, float]]:
        """The "t5xxl" tokens as [(token, weight)]; a clip given no T5 tokens encodes the empty prompt."""
        given = tokens.get("t5xxl")
        if given is None:
            return [(1, 1.0)] + [(0, 1.0)] * (T5_MIN_LENGTH[self.family] - 1)
        if isinstance(given, torch.Tensor):
            return [(int(t), 1.0) for t in given.reshape(-1)]
        return [item if isinstance(item, tuple) else (int(item), 1.0) for item in given]

    @staticmethod
    def _combine_sd3(outputs: Mapping[str, tuple[torch.Tensor, torch.Tensor]], t5_out: torch.Tensor | None) \
            -> tuple[torch.Tensor, torch.Tensor]:
        width = t5_out.shape[-1] if t5_out is not None else T5_WIDTH_SD3
        l_cond, l_pooled = outputs.get("l", (None, torch.zeros(1, 768)))
        g_cond, g_pooled = outputs.get("g", (None, torch.zeros(1, 1280)))
        clip_cond = None
        if l_cond is not None or g_cond is not None:
            # A missing CLIP's half is zeros, as ComfyUI fills it.
            reference = l_cond if l_cond is not None else g_cond
            assert reference is not None
            tokens = reference.shape[1]
            l_part = l_cond if l_cond is not None else torch.zeros(1, tokens, 768)
            g_part = g_cond if g_cond is not None else torch.zeros(1, tokens, 1280)
            shared = min(l_part.shape[1], g_part.shape[1])
            clip_cond = torch.cat([l_part[:, :shared], g_part[:, :shared]], dim=-1)
            clip_cond = torch.nn.functional.pad(clip_cond, (0, max(0, width - clip_cond.shape[-1])))
        pooled = torch.cat([l_pooled, g_pooled], dim=-1)
        if clip_cond is None and t5_out is None:
            return torch.zeros(1, 77, width), pooled
        if clip_cond is None:
            assert t5_out is not None
            return t5_out, pooled
        if t5_out is None:
            return clip_cond, pooled
        return torch.cat([clip_cond, t5_out], dim=-2), pooled


def build_t5(state: Mapping[str, torch.Tensor], prefix: str, dtype: torch.dtype, what: str) -> torch.nn.Module:
    from .checkpoint import _materialize

    model = t5_encoder_model(t5_config(state, prefix))
    return _materialize(model, t5_weights(state, prefix), dtype, what)


def checkpoint_family_clip(state: Mapping[str, torch.Tensor], family: str, dtype: torch.dtype,
                           path: Path) -> FamilyClip | Lumina2Clip | None:
    """The text encoders an all-in-one SD3 / Flux file carries under text_encoders.*, or None (also for families
    whose text encoders are not built yet)."""
    from . import detect
    from .checkpoint import build_text_encoder

    if family == "lumina2":  # Gemma 2 (nodes.diffusion.gemma_text)
        from .gemma_text import checkpoint_clip as gemma_checkpoint_clip

        return gemma_checkpoint_clip(state, dtype, path)
    if family in ("auraflow", "chroma"):  # one T5 encoder (nodes.diffusion.t5_families)
        from .t5_families import checkpoint_clip

        return checkpoint_clip(state, family, dtype, path)
    if family not in ALLOWED:
        return None

    encoders: dict[str, torch.nn.Module] = {}
    for slot in sorted(ALLOWED[family]):
        prefix = CHECKPOINT_PREFIXES[slot]
        if slot == "t5xxl":
            if find_t5_prefix(state) == prefix:
                encoders[slot] = build_t5(state, prefix, dtype, f"{path.name} (T5-XXL)")
        elif any(key.startswith(prefix) for key in state):
            shape = detect.read_text_encoder_shape(state, prefix)
            encoders[slot] = build_text_encoder(state, shape, slot, dtype, what=f"{path.name} (CLIP-{slot})")
    if not encoders:
        return None
    return FamilyClip(encoders=torch.nn.ModuleDict(encoders), family=family, source=str(path),
                      t5_tokenizer_dirs=tokenizer_search_dirs(path) if "t5xxl" in encoders else ())


def load_family_clip(paths: list[Path], clip_type: str, dtype: torch.dtype) -> FamilyClip:
    """CLIPLoader / DualCLIPLoader / TripleCLIPLoader for types sd3 and flux: each file is a CLIP-L, a CLIP-G or a
    T5-XXL encoder, in any order."""
    from .checkpoint import (
        ModelFileError,
        _text_encoder_in_file,
        build_text_encoder,
        read_state_dict,
        text_encoder_slot,
    )

    encoders: dict[str, torch.nn.Module] = {}
    tokenizer_dirs: tuple[Path, ...] = ()
    for path in paths:
        state = read_state_dict(path)
        t5_prefix = find_t5_prefix(state)
        if t5_prefix is not None:
            slot = "t5xxl"
            tokenizer_dirs = tokenizer_search_dirs(path)
            module = build_t5(state, t5_prefix, dtype, path.name)
        else:
            shape = _text_encoder_in_file(state, path.name)
            slot = "g" if text_encoder_slot(shape) in ("g", "h") else "l"
            module = build_text_encoder(state, shape, slot, dtype, what=path.name)
        if slot not in ALLOWED[clip_type]:
            raise ModelFileError(f"{path.name}: a CLIP-{slot.upper()} encoder is not part of a {clip_type} CLIP "
                                 f"(it takes {', '.join(sorted(ALLOWED[clip_type]))})")
        if slot in encoders:
            raise ModelFileError(f"{path.name}: a second {slot} encoder; {clip_type} needs different ones")
        encoders[slot] = module
    return FamilyClip(encoders=torch.nn.ModuleDict(encoders), family=clip_type,
                      source=";".join(str(p) for p in paths), t5_tokenizer_dirs=tokenizer_dirs)
