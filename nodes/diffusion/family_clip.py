"""What a CLIP link carries for SD3 / SD3.5 and Flux: CLIP-L, CLIP-G and T5-XXL encoders combined as ComfyUI's
SD3 and Flux clip models combine them.

SD3: CLIP-L and CLIP-G penultimate hidden states (no final LayerNorm) side by side (768 + 1280), zero-padded to
T5's 4096 width, then T5's tokens appended along the sequence; pooled = [CLIP-L pooled (unprojected) ‖ CLIP-G
pooled (projected)], zeros when no CLIP is loaded. Flux: the conditioning is T5's output, the pooled vector
CLIP-L's final-LayerNorm EOS state (unprojected).

Tokens: {"l": chunks, "g": chunks} as the SD CLIPs make them, plus "t5xxl": T5 token ids (a list of ints or a
[1, T] tensor). The T5 SentencePiece vocabulary is not available offline, so `tokenize` refuses prompts for a
clip with a T5 encoder (clearly, naming the reason); encode_tokens works on given ids.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .clip import EncoderRole, encode_chunks
from .t5 import encode_t5, find_t5_prefix, t5_config, t5_encoder_model, t5_weights
from .tokenizer import OPENCLIP_CHUNKS, SD1_CHUNKS, empty_chunk, tokenize_prompt

T5_WIDTH_SD3 = 4096
T5_TOKENIZER_MISSING = ("T5 prompts cannot be tokenized: T5's SentencePiece vocabulary (spiece.model / "
                        "tokenizer.json) is not installed with this engine and cannot be downloaded offline")
ROLES: dict[str, dict[str, EncoderRole]] = {
    "sd3": {"l": EncoderRole(SD1_CHUNKS, -2, False), "g": EncoderRole(OPENCLIP_CHUNKS, -2, False)},
    "flux": {"l": EncoderRole(SD1_CHUNKS, None, True)},
}
ALLOWED = {"sd3": {"l", "g", "t5xxl"}, "flux": {"l", "t5xxl"}}
CHECKPOINT_PREFIXES = {"l": "text_encoders.clip_l.transformer.", "g": "text_encoders.clip_g.transformer.",
                       "t5xxl": "text_encoders.t5xxl.transformer."}


class TokenizerUnavailable(RuntimeError):
    """Prompt text cannot be tokenized for one of the clip's encoders."""


@dataclass(frozen=True, eq=False)
class FamilyClip:
    """Text encoders of an SD3 / Flux clip ("l", "g", "t5xxl", any subset ComfyUI accepts) + family."""

    encoders: torch.nn.ModuleDict
    family: str                              # "sd3" | "flux"
    layer_idx: int | None = None
    patches: tuple[Any, ...] = ()
    source: str = ""
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.family not in ALLOWED:
            raise ValueError(f"unknown transformer-family CLIP {self.family!r}; known: {', '.join(ALLOWED)}")
        extra = set(self.encoders) - ALLOWED[self.family]
        if extra or not self.encoders:
            raise ValueError(f"a {self.family} CLIP takes encoders {sorted(ALLOWED[self.family])}, "
                             f"got {sorted(self.encoders)}")

    def clone_with_layer(self, layer_idx: int | None) -> FamilyClip:
        return dataclasses.replace(self, layer_idx=layer_idx, options=dict(self.options))

    def with_patches(self, *patches: Any) -> FamilyClip:
        return dataclasses.replace(self, patches=self.patches + tuple(patches), options=dict(self.options))

    def cache_nbytes(self) -> int:
        return 0

    @contextlib.contextmanager
    def prepared(self, manager: Any = None) -> Iterator[torch.nn.ModuleDict]:
        lease = manager.use(self.encoders) if manager is not None else contextlib.nullcontext(self.encoders)
        with lease as modules:
            restores = []
            try:
                for patch in self.patches:
                    restores.append(patch.apply(modules))
                yield modules
            finally:
                for restore in reversed(restores):
                    restore()

    def _clip_roles(self) -> dict[str, EncoderRole]:
        return {key: role for key, role in ROLES[self.family].items() if key in self.encoders}

    def tokenize(self, text: str, resolve_embedding: Any = None, warn: Any = None) -> dict[str, Any]:
        if "t5xxl" in self.encoders:
            raise TokenizerUnavailable(T5_TOKENIZER_MISSING)
        from .clip import encoder_width

        return {key: tokenize_prompt(text, role.chunks, key, encoder_width(self.encoders[key]),
                                     resolve_embedding, warn)
                for key, role in self._clip_roles().items()}

    def encode_tokens(self, tokens: Mapping[str, Any], manager: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(cond [1, T, D], pooled [1, P]) float32 on the CPU."""
        outputs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        t5_out = None
        with self.prepared(manager) as modules:
            for key, role in self._clip_roles().items():
                chunks = tokens.get(key) or [empty_chunk(role.chunks)]
                layer = self.layer_idx if self.layer_idx is not None else role.default_layer
                outputs[key] = encode_chunks(modules[key], chunks, role, layer, projected=key == "g")
            if "t5xxl" in modules:
                if "t5xxl" not in tokens:
                    raise TokenizerUnavailable(T5_TOKENIZER_MISSING)
                ids = torch.as_tensor(tokens["t5xxl"], dtype=torch.long).reshape(1, -1)
                t5_out = encode_t5(modules["t5xxl"], ids)
        if self.family == "flux":
            if t5_out is None:
                raise ValueError("a Flux CLIP needs its T5-XXL encoder for the conditioning")
            pooled = outputs["l"][1] if "l" in outputs else torch.zeros(1, 768)
            return t5_out, pooled
        return self._combine_sd3(outputs, t5_out)

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
                           path: Path) -> FamilyClip | None:
    """The text encoders an all-in-one SD3 / Flux file carries under text_encoders.*, or None (also for families
    whose text encoders are not built yet)."""
    from . import detect
    from .checkpoint import build_text_encoder

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
    return FamilyClip(encoders=torch.nn.ModuleDict(encoders), family=family, source=str(path))


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
    for path in paths:
        state = read_state_dict(path)
        t5_prefix = find_t5_prefix(state)
        if t5_prefix is not None:
            slot = "t5xxl"
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
                      source=";".join(str(p) for p in paths))
