"""Qwen-Image's text encoder: the language model of Qwen2.5-VL-7B, as ComfyUI's CLIPLoader type "qwen_image" uses it.

ComfyUI (comfy/text_encoders/qwen_image.py) wraps the prompt in a chat template (a fixed system prompt, then
"<|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n"), runs the language model without padding or
mask, takes the last layer's hidden states after the final RMSNorm, and drops the template's head: everything
before the second "<|im_start|>", plus that "<|im_start|>", "user" and "\\n" when they follow (34 tokens with
Qwen's vocabulary; diffusers' QwenImagePipeline drops the same 34). There is no pooled output.

The file (`qwen_2.5_vl_7b.safetensors`) holds the original Qwen2.5-VL names: model.embed_tokens / model.layers.* /
model.norm for the language model, visual.* for the vision tower, lm_head. The language model is transformers'
Qwen2_5_VLTextModel; the vision tower (nodes.diffusion.qwen_vision), built when the file has it, encodes the
images of TextEncodeQwenImageEdit(Plus): as ComfyUI, each `<|image_pad|>` token of the prompt (the first ones, one
per image) is replaced by the image's merged vision tokens and the language model gets multimodal rotary positions.

Tokenizer: Qwen2's byte-level BPE (vocab.json + merges.txt, or tokenizer.json) is not shipped with this engine
and cannot be downloaded offline. It is looked up, in this order, in `<file stem>_tokenizer/` and
`qwen25_tokenizer/` beside the encoder file, and in `text_encoders/qwen25_tokenizer/` of the models folder
(ComfyUI ships the same files as comfy/text_encoders/qwen25_tokenizer/: copy that folder there).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch

from . import encoder_set, qwen_vision
from .encoder_set import EncoderSet
from .family_clip import TokenizerUnavailable
from .offline import ensure_offline

ENCODER_KEY = "qwen25_7b"
VISION_KEY = "qwen25_7b_visual"
IMAGE_PAD = "<|image_pad|>"
TEXT_PREFIXES = ("text_encoders.qwen25_7b.transformer.model.", "model.language_model.", "model.")
HEAD_DIM = 128  # Qwen2.5-VL's attention head width (ComfyUI's Qwen25_7BVLI_Config)
IMAGE_TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, "
                  "text, spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}"
                  "<|im_end|>\n<|im_start|>assistant\n")
EDIT_TEMPLATE = ("<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, "
                 "objects, background), then explain how the user's text instruction should alter or modify the "
                 "image. Generate a new image that meets the user's requirements while maintaining consistency "
                 "with the original input where appropriate.<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
                 "<|im_start|>assistant\n")
# ComfyUI's template when images are given and the node names no template (TextEncodeQwenImageEdit).
EDIT_IMAGE_TEMPLATE = ("<|im_start|>system\nDescribe the key features of the input image (color, shape, size, "
                       "texture, objects, background), then explain how the user's text instruction should alter or "
                       "modify the image. Generate a new image that meets the user's requirements while maintaining "
                       "consistency with the original input where appropriate.<|im_end|>\n<|im_start|>user\n"
                       "<|vision_start|><|image_pad|><|vision_end|>{}<|im_end|>\n<|im_start|>assistant\n")
PICTURE_PROMPT = "Picture {}: <|vision_start|>" + IMAGE_PAD + "<|vision_end|>"  # TextEncodeQwenImageEditPlus
TOKENIZER_FOLDER = "qwen25_tokenizer"
NO_VISION_TOWER = ("images cannot be encoded: this Qwen2.5-VL file has no vision tower (visual.* weights); "
                   "text-only prompts work")


def tokenizer_folders(encoder_file: Path) -> tuple[Path, ...]:
    return encoder_set.tokenizer_folders(encoder_file, TOKENIZER_FOLDER)


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or (
        (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file())


def load_tokenizer(folders: tuple[Path, ...]) -> Any:
    """transformers' Qwen2Tokenizer from the first folder that holds one; TokenizerUnavailable otherwise."""
    folder = next((f for f in folders if _has_tokenizer(f)), None)
    if folder is None:
        searched = ", ".join(str(f) for f in folders)
        raise TokenizerUnavailable(
            f"Qwen-Image prompts cannot be tokenized: Qwen2's BPE vocabulary (vocab.json + merges.txt or "
            f"tokenizer.json) is not installed with this engine and cannot be downloaded offline; put it in one of: "
            f"{searched}")
    ensure_offline()
    from transformers import Qwen2Tokenizer

    return Qwen2Tokenizer.from_pretrained(str(folder), local_files_only=True)


def template_end(ids: list[int], im_start: int, user: int | None, newline: int | None, length: int | None = None) \
        -> int:
    """ComfyUI's cut: the index of the second <|im_start|> (the last one before it if there is only one),
    moved past "user\\n" when those follow and the encoded sequence (`length`, with vision tokens) is longer."""
    end = -1
    seen = 0
    for index, token in enumerate(ids):
        if token == im_start and seen < 2:
            end = index
            seen += 1
    if end == -1:
        return 0  # ComfyUI's out[:, -1:] would keep one token; with no template at all keep everything
    if (len(ids) if length is None else length) > end + 3 and ids[end + 1] == user and ids[end + 2] == newline:
        end += 3
    return end


def _single_id(tokenizer: Any, text: str) -> int | None:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[0] if len(ids) == 1 else None


@dataclass(frozen=True, eq=False)
class QwenImageClip(EncoderSet):
    """What a CLIP link carries for Qwen-Image: the Qwen2.5-VL language model and where its tokenizer lives."""

    encoders: torch.nn.ModuleDict
    tokenizer_dirs: tuple[Path, ...] = ()
    family: str = "qwen_image"
    layer_idx: int | None = None             # CLIPSetLastLayer is accepted but, as in ComfyUI, not used
    patches: tuple[Any, ...] = ()
    source: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    _tokenizer: list[Any] = field(default_factory=list, repr=False)  # loaded on first use, shared by clones

    def tokenizer(self) -> Any:
        if not self._tokenizer:
            self._tokenizer.append(load_tokenizer(self.tokenizer_dirs))
        return self._tokenizer[0]

    @property
    def has_vision(self) -> bool:
        return VISION_KEY in self.encoders

    def tokenize(self, text: str, resolve_embedding: Any = None, warn: Any = None, images: list[Any] | None = None,
                 llama_template: str | None = None) -> dict[str, Any]:
        """{"qwen25_7b": token ids, "template_end": how many leading tokens the encoder drops, "images": [(index of
        an <|image_pad|> token, IMAGE)] for the first pads, one per image (extra images are unused, as in ComfyUI)}."""
        images = list(images or [])
        if images and not self.has_vision:
            raise ValueError(NO_VISION_TOWER)
        if text.startswith("<|im_start|>") or text.startswith("<|start_header_id|>"):
            templated = text  # already a full chat prompt, as ComfyUI accepts
        else:
            templated = (llama_template or (EDIT_IMAGE_TEMPLATE if images else IMAGE_TEMPLATE)).format(text)
        tokenizer = self.tokenizer()
        ids = list(tokenizer(templated, add_special_tokens=False)["input_ids"])
        pad = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        slots = [index for index, token in enumerate(ids) if token == pad][:len(images)]
        placed = list(zip(slots, images, strict=False))
        length = len(ids) + sum(qwen_vision.merged_token_count(image.shape[1], image.shape[2]) - 1
                                for _, image in placed)
        im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
        cut = template_end(ids, im_start, _single_id(tokenizer, "user"), _single_id(tokenizer, "\n"), length)
        tokens: dict[str, Any] = {ENCODER_KEY: ids, "template_end": cut}
        if placed:
            tokens["images"] = placed
        return tokens

    def encode_tokens(self, tokens: Mapping[str, Any], manager: Any = None) -> tuple[torch.Tensor, None]:
        """(cond [1, T, D] float32 on the CPU, no pooled output)."""
        if ENCODER_KEY not in tokens:
            raise ValueError("Qwen-Image tokens need their 'qwen25_7b' token ids")
        ids = torch.as_tensor(tokens[ENCODER_KEY], dtype=torch.long).reshape(1, -1)
        cut = int(tokens.get("template_end", 0))
        images = tokens.get("images") or []
        with self.prepared(manager) as modules, torch.no_grad():
            model = modules[ENCODER_KEY]
            device = next(model.parameters()).device
            ids = ids.to(device)
            if not images:
                hidden = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
            else:
                if VISION_KEY not in modules:
                    raise ValueError(NO_VISION_TOWER)
                embeds, positions = _splice_images(cast(Any, model).embed_tokens(ids), images, modules[VISION_KEY])
                mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=device)
                hidden = model(inputs_embeds=embeds, attention_mask=mask,
                               position_ids=positions[:, None].to(device)).last_hidden_state
        # ComfyUI cuts the encoded sequence at the template's index among the tokens (images count as one).
        return hidden[:, cut:].float().cpu(), None


def _splice_images(embeds: torch.Tensor, images: list[tuple[int, torch.Tensor]], visual: torch.nn.Module) \
        -> tuple[torch.Tensor, torch.Tensor]:
    """Each image's vision tokens in place of its <|image_pad|> token embedding [1, T, D]; and the M-RoPE
    position ids [3, T'] of the resulting sequence."""
    pieces, spans = [], []
    cursor = length = 0
    for slot, image in sorted(images, key=lambda placed: placed[0]):
        vision, (grid_h, grid_w) = qwen_vision.encode_image(visual, image)
        pieces.append(embeds[:, cursor:slot])
        length += slot - cursor
        spans.append(qwen_vision.VisionSpan(length, vision.shape[0], grid_h, grid_w))
        pieces.append(vision[None].to(embeds.dtype))
        length += vision.shape[0]
        cursor = slot + 1
    pieces.append(embeds[:, cursor:])
    length += embeds.shape[1] - cursor
    return torch.cat(pieces, dim=1), qwen_vision.rope_positions(length, spans)


def find_text_prefix(state: Mapping[str, Any]) -> str | None:
    return next((p for p in TEXT_PREFIXES if f"{p}embed_tokens.weight" in state and f"{p}norm.weight" in state),
                None)


def text_config(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, Any]:
    """Qwen2_5_VLTextConfig arguments from the tensor shapes (Qwen2.5-VL's fixed head width, θ and ε)."""
    vocab, hidden = state[f"{prefix}embed_tokens.weight"].shape
    layers = len({m.group(1) for key in state if (m := re.match(re.escape(prefix) + r"layers\.(\d+)\.", key))})
    heads = state[f"{prefix}layers.0.self_attn.q_proj.weight"].shape[0] // HEAD_DIM
    kv_heads = state[f"{prefix}layers.0.self_attn.k_proj.weight"].shape[0] // HEAD_DIM
    if heads * HEAD_DIM != hidden or kv_heads == 0:
        raise ValueError(f"a Qwen2.5-VL language model {hidden} wide whose attention is not in {HEAD_DIM}-wide heads")
    return {"vocab_size": int(vocab), "hidden_size": int(hidden), "num_hidden_layers": layers,
            "intermediate_size": int(state[f"{prefix}layers.0.mlp.gate_proj.weight"].shape[0]),
            "num_attention_heads": int(heads), "num_key_value_heads": int(kv_heads), "rms_norm_eps": 1e-6,
            "max_position_embeddings": 128000,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}}


def build_text_model(state: Mapping[str, torch.Tensor], prefix: str, dtype: torch.dtype, what: str) \
        -> torch.nn.Module:
    ensure_offline()
    from transformers import Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel

    from .checkpoint import _materialize

    model = encoder_set.meta_text_model(Qwen2_5_VLTextModel, Qwen2_5_VLTextConfig(**text_config(state, prefix)))
    weights = {key[len(prefix):]: value for key, value in state.items()
               if key.startswith(prefix) and not key[len(prefix):].startswith(("visual.", "lm_head."))
               and not (prefix == "model." and key.startswith("model.language_model."))}
    return _materialize(model, weights, dtype, what)


def _encoders(state: Mapping[str, torch.Tensor], prefix: str, dtype: torch.dtype, what: str) -> torch.nn.ModuleDict:
    """The language model, and the vision tower when the file has one."""
    modules = {ENCODER_KEY: build_text_model(state, prefix, dtype, what)}
    visual = qwen_vision.vision_prefix(prefix)
    if qwen_vision.has_vision_tower(state, visual):
        modules[VISION_KEY] = qwen_vision.build_vision_model(state, visual, dtype, f"{what} (vision tower)")
    return torch.nn.ModuleDict(modules)


def load_qwen_clip(paths: list[Path], dtype: torch.dtype) -> QwenImageClip:
    """CLIPLoader type "qwen_image": one Qwen2.5-VL-7B file."""
    from .checkpoint import ModelFileError, read_state_dict
    from .families import describe_keys

    if len(paths) != 1:
        raise ModelFileError("a qwen_image CLIP is one Qwen2.5-VL file")
    path = paths[0]
    state = read_state_dict(path)
    prefix = find_text_prefix(state)
    if prefix is None:
        raise ModelFileError(f"{path.name}: not a Qwen2.5-VL text encoder (no model.embed_tokens / model.norm); "
                             f"found {describe_keys(state)}")
    try:
        encoders = _encoders(state, prefix, dtype, path.name)
    except ModelFileError:
        raise
    except ValueError as error:
        raise ModelFileError(f"{path.name}: {error}") from error
    return QwenImageClip(encoders=encoders, tokenizer_dirs=tokenizer_folders(path), source=str(path))


def checkpoint_qwen_clip(state: Mapping[str, torch.Tensor], dtype: torch.dtype, path: Path) -> QwenImageClip | None:
    """The Qwen2.5-VL text encoder an all-in-one Qwen-Image file carries under text_encoders.qwen25_7b., or None."""
    prefix = TEXT_PREFIXES[0]
    if find_text_prefix(state) != prefix:
        return None
    encoders = _encoders(state, prefix, dtype, f"{path.name} (Qwen2.5-VL)")
    return QwenImageClip(encoders=encoders, tokenizer_dirs=tokenizer_folders(path), source=str(path))
