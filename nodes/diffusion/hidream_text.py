"""What a CLIP link carries for HiDream: CLIP-L, CLIP-G, T5-XXL and Llama-3.1 combined as ComfyUI's HiDream text
encoder combines them (comfy/text_encoders/hidream.py), any subset of the four.

* conditioning: T5's last hidden state for the prompt's first 128 tokens (EOS included; padded to 128 with the
  attention mask covering the tokens up to the EOS); zeros [1, 128, 4096] without T5;
* pooled: the projected pooled outputs of CLIP-L ‖ CLIP-G (zeros for a missing one: 768 / 1280 wide);
* options["conditioning_llama3"]: the Llama hidden states of every layer [1, layers, T, D]
  (nodes.diffusion.llama_text); zeros [1, 32, 1, 4096] without Llama.

HiDream's CLIPs are "long" CLIPs (248 positions): their prompts are framed in chunks as long as the position
table, as ComfyUI's long-CLIP support does. Only their pooled outputs are used, which read the first chunk.
The clip's layer option (CLIPSetLastLayer) changes nothing here: the pooled outputs come from the last layer, T5
and Llama keep theirs.

encode_tokens returns an `EncodedText`: the (cond, pooled) pair every caller unpacks, carrying the extra
conditioning options that the text-encode nodes merge into the conditioning.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch

from . import llama_text
from .clip import EncoderRole, encode_chunks, encoder_width
from .encoder_set import EncoderSet
from .t5 import find_t5_prefix, find_t5_tokenizer, t5_tokenize, tokenizer_search_dirs
from .tokenizer import OPENCLIP_CHUNKS, SD1_CHUNKS, apply_token_weights, tokenize_prompt

T5_LENGTH = 128                      # ComfyUI's HiDream T5XXLTokenizer: min and max length 128, first chunk only
T5_EOS_ID, T5_PAD_ID = 1, 0
ZERO_WIDTHS = {"l": 768, "g": 1280, "t5xxl": 4096, "llama": 4096}   # ComfyUI's zeros for missing encoders
ZERO_LLAMA_LAYERS = 32
SLOTS = ("l", "g", "t5xxl", "llama")


class EncodedText(tuple):
    """(cond, pooled) with `options`: extra conditioning options the encoding produced."""

    options: dict[str, Any]

    def __new__(cls, cond: torch.Tensor, pooled: torch.Tensor, options: dict[str, Any]) -> EncodedText:
        encoded = super().__new__(cls, (cond, pooled))
        encoded.options = options
        return encoded


def _clip_role(module: torch.nn.Module, slot: str) -> EncoderRole:
    from .clip import text_transformer

    positions = text_transformer(module).embeddings.position_embedding.weight.shape[0]
    base = SD1_CHUNKS if slot == "l" else OPENCLIP_CHUNKS
    return EncoderRole(dataclasses.replace(base, length=int(positions)), None, True)


def _t5_first_chunk(tokens: list[Any]) -> list[Any]:
    """t5_tokenize's [tokens..., EOS] cut to ComfyUI's first 128-token chunk: at most 127 tokens, EOS, pads."""
    kept = tokens[:-1][:T5_LENGTH - 1] + tokens[-1:]
    return kept + [(T5_PAD_ID, 1.0)] * (T5_LENGTH - len(kept))


def _as_weighted(given: Any) -> list[Any]:
    if isinstance(given, torch.Tensor):
        return [(int(t), 1.0) for t in given.reshape(-1)]
    return [item if isinstance(item, tuple) else (int(item), 1.0) for item in given]


def encode_t5_masked(module: torch.nn.Module, tokens: Sequence[Any]) -> torch.Tensor:
    """T5's last hidden state [1, T, D] with ComfyUI's attention mask (1 up to and including the first EOS) and
    token-weight rule (z_empty: [EOS, pad, ...] of the same length)."""
    def run(weighted: Sequence[Any]) -> torch.Tensor:
        embedding = cast(Any, module).get_input_embeddings()
        device = embedding.weight.device
        ids = torch.tensor([[t if isinstance(t, int) else T5_PAD_ID for t, _ in weighted]], device=device)
        eos = next((i for i, (t, _) in enumerate(weighted) if isinstance(t, int) and t == T5_EOS_ID),
                   len(weighted) - 1)
        mask = torch.zeros_like(ids)
        mask[0, :eos + 1] = 1
        with torch.no_grad():
            embeds = embedding(ids).clone()
            for position, (token, _) in enumerate(weighted):
                if not isinstance(token, int):
                    embeds[0, position] = token.to(embeds)
            return module(inputs_embeds=embeds, attention_mask=mask).last_hidden_state.float().cpu()

    tokens = list(tokens) or [(T5_EOS_ID, 1.0)]
    return apply_token_weights(run(tokens), tokens,
                               lambda: run([(T5_EOS_ID, 1.0)] + [(T5_PAD_ID, 1.0)] * (len(tokens) - 1)))


@dataclass(frozen=True, eq=False)
class HiDreamClip(EncoderSet):
    """HiDream's text encoders ("l", "g", "t5xxl", "llama": any non-empty subset) and their tokenizer folders."""

    encoders: torch.nn.ModuleDict
    family: str = "hidream"
    layer_idx: int | None = None
    patches: tuple[Any, ...] = ()
    source: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    t5_tokenizer_dirs: tuple[Path, ...] = ()
    llama_tokenizer_dirs: tuple[Path, ...] = ()

    def __post_init__(self) -> None:
        extra = set(self.encoders) - set(SLOTS)
        if extra or not self.encoders:
            raise ValueError(f"a HiDream CLIP takes encoders {list(SLOTS)}, got {sorted(self.encoders)}")

    def tokenize(self, text: str, resolve_embedding: Any = None, warn: Any = None) -> dict[str, Any]:
        """The prompt's tokens for each loaded encoder (tokenizers are only needed for encoders that are there)."""
        tokens: dict[str, Any] = {}
        for slot in ("l", "g"):
            if slot in self.encoders:
                module = self.encoders[slot]
                tokens[slot] = tokenize_prompt(text, _clip_role(module, slot).chunks, slot, encoder_width(module),
                                               resolve_embedding, warn)
        if "t5xxl" in self.encoders:
            width = cast(Any, self.encoders["t5xxl"]).get_input_embeddings().weight.shape[1]
            tokens["t5xxl"] = _t5_first_chunk(t5_tokenize(text, find_t5_tokenizer(self.t5_tokenizer_dirs), 0, 0,
                                                          width, resolve_embedding, warn))
        if "llama" in self.encoders:
            width = cast(Any, self.encoders["llama"]).get_input_embeddings().weight.shape[1]
            tokenizer = llama_text.find_tokenizer(self.llama_tokenizer_dirs)
            tokens["llama"] = llama_text.llama_tokenize(text, tokenizer, width, resolve_embedding, warn)
        return tokens

    def _llama_ids(self) -> tuple[int, int]:
        try:
            tokenizer = llama_text.find_tokenizer(self.llama_tokenizer_dirs)
        except llama_text.TokenizerUnavailable:
            return llama_text.BOS_ID, llama_text.PAD_ID
        return tokenizer.bos_id, tokenizer.pad_id

    def encode_tokens(self, tokens: Mapping[str, Any], manager: Any = None) -> EncodedText:
        """(T5 cond [1, 128, D], pooled [1, L + G]) float32 on the CPU, options["conditioning_llama3"]."""
        for slot in ("t5xxl", "llama"):
            if slot in self.encoders and tokens.get(slot) is None:
                raise ValueError(f"HiDream tokens need their {slot!r} tokens (tokenize the prompt with this clip)")
        with self.prepared(manager) as modules:
            pooled_parts = []
            for slot in ("l", "g"):
                if slot in modules and tokens.get(slot):
                    role = _clip_role(modules[slot], slot)
                    pooled_parts.append(encode_chunks(modules[slot], tokens[slot], role, None, projected=True)[1])
                else:
                    pooled_parts.append(torch.zeros(1, ZERO_WIDTHS[slot]))
            t5_out = encode_t5_masked(modules["t5xxl"], _as_weighted(tokens["t5xxl"])) if "t5xxl" in modules \
                else torch.zeros(1, T5_LENGTH, ZERO_WIDTHS["t5xxl"])
            if "llama" in modules:
                llama_out = llama_text.encode_llama(modules["llama"], _as_weighted(tokens["llama"]),
                                                    *self._llama_ids())
            else:
                llama_out = torch.zeros(1, ZERO_LLAMA_LAYERS, 1, ZERO_WIDTHS["llama"])
        return EncodedText(t5_out, torch.cat(pooled_parts, dim=-1), {"conditioning_llama3": llama_out})


# Loading ---------------------------------------------------------------------------------------------------------

def build_clip(state: Mapping[str, torch.Tensor], shape: Any, slot: str, dtype: torch.dtype, what: str) \
        -> torch.nn.Module:
    """A CLIP-L / CLIP-G text model; HiDream's CLIP-L keeps its text projection (its pooled output is projected)."""
    from . import convert, detect, model_code
    from .checkpoint import _materialize, build_text_encoder

    if slot == "g" or shape.projection_dim is None or shape.layout != "hf":
        return build_text_encoder(state, shape, slot, dtype, what=what)
    config_class, _, with_projection = model_code.clip_text_classes()
    with torch.device("meta"):
        model = with_projection(config_class(**detect.text_encoder_config(shape, "l")))
    return _materialize(model, convert.clip_from_hf_layout(state, shape.prefix), dtype, what)


def _clip_slots(shapes: Mapping[Path, Any]) -> dict[Path, str]:
    """CLIP-L or CLIP-G: 768 / 1280 wide; other widths (tiny models): of two, the narrower is L; one alone is
    told by the engine's rule for stand-alone encoders (checkpoint.text_encoder_slot)."""
    from .checkpoint import text_encoder_slot

    known = {768: "l", 1280: "g"}
    slots = {path: known[shape.hidden_size] for path, shape in shapes.items() if shape.hidden_size in known}
    rest = [path for path in shapes if path not in slots]
    if len(rest) == 2 and len(slots) == 0:
        narrow, wide = sorted(rest, key=lambda path: shapes[path].hidden_size)
        return {narrow: "l", wide: "g"}
    for path in rest:
        slots[path] = "g" if text_encoder_slot(shapes[path]) in ("g", "h") else "l"
    return slots


def load_hidream_clip(paths: list[Path], dtype: torch.dtype) -> HiDreamClip:
    """QuadrupleCLIPLoader, and CLIPLoader / DualCLIPLoader type "hidream": CLIP-L, CLIP-G, T5-XXL and Llama files
    in any order (any subset of them)."""
    from .checkpoint import ModelFileError, _text_encoder_in_file, read_state_dict
    from .family_clip import build_t5

    encoders: dict[str, torch.nn.Module] = {}
    t5_dirs: tuple[Path, ...] = ()
    llama_dirs: tuple[Path, ...] = ()
    clip_files: dict[Path, tuple[dict[str, torch.Tensor], Any]] = {}

    def claim(slot: str, path: Path) -> None:
        if slot in encoders:
            raise ModelFileError(f"{path.name}: a second {slot} encoder; a HiDream CLIP takes one CLIP-L, one "
                                 f"CLIP-G, one T5-XXL and one Llama file")

    for path in paths:
        state = read_state_dict(path)
        llama_prefix = llama_text.find_text_prefix(state)
        t5_prefix = find_t5_prefix(state) if llama_prefix is None else None
        if llama_prefix is not None:
            claim("llama", path)
            try:
                encoders["llama"] = llama_text.build_llama(state, llama_prefix, dtype, path.name)
            except ValueError as failure:
                if isinstance(failure, ModelFileError):
                    raise
                raise ModelFileError(f"{path.name}: {failure}") from failure
            llama_dirs = llama_text.tokenizer_folders(path)
        elif t5_prefix is not None:
            claim("t5xxl", path)
            encoders["t5xxl"] = build_t5(state, t5_prefix, dtype, path.name)
            t5_dirs = tokenizer_search_dirs(path)
        else:
            clip_files[path] = (state, _text_encoder_in_file(state, path.name))
    for path, slot in _clip_slots({path: shape for path, (_, shape) in clip_files.items()}).items():
        claim(slot, path)
        state, shape = clip_files[path]
        encoders[slot] = build_clip(state, shape, slot, dtype, path.name)
    return HiDreamClip(encoders=torch.nn.ModuleDict({slot: encoders[slot] for slot in SLOTS if slot in encoders}),
                       source=";".join(str(p) for p in paths), t5_tokenizer_dirs=t5_dirs,
                       llama_tokenizer_dirs=llama_dirs)
