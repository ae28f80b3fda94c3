"""Llama-3.1-8B-Instruct as HiDream's fourth text encoder (ComfyUI's comfy/text_encoders/hidream.py + llama.py).

The file (`llama_3.1_8b_instruct*.safetensors`) holds the language model under `model.` (embed_tokens,
layers.N.*, norm; an `lm_head` beside it is not used). The network is transformers' LlamaModel with ComfyUI's
Llama2Config numerics: 128-wide heads, RMS ε 1e-5, plain rotary embedding with θ 500000 (ComfyUI applies no
Llama-3.1 "llama3" frequency scaling, so neither does this). ComfyUI's scaled-fp8 files (fp8 weights with a
`scale_weight` per layer) are de-quantized on load.

Encoding (ComfyUI's LLAMAModel with layer="all"): the output of every layer, the last one after the final norm
(transformers' hidden_states[1:]), stacked to [1, layers, T, D]. Tokens are BOS followed by each weighted
segment's ids (no end token), padded to at least 128 with the pad id <|eot_id|>; no truncation. The attention
mask covers the tokens before the first pad. A token of weight w becomes (z − z_empty)·w + z_empty in every layer,
z_empty the encoding of [BOS, pad, ...] of the same length (ComfyUI's rule as it applies it to single-layer
encoders; its layer="all" code indexes the layers by token position, which is not reproduced).

Tokenizer: a `tokenizer.json` (Llama 3's, as ComfyUI bundles it in comfy/text_encoders/llama_tokenizer/ or a
diffusers HiDream repository in tokenizer_4/) in `<file stem>_tokenizer/` or `llama_tokenizer/` beside the file,
or in `text_encoders/llama_tokenizer/` of the models folder. Without one, tokenize raises TokenizerUnavailable
naming the folders.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import encoder_set
from .family_clip import TokenizerUnavailable
from .offline import ensure_offline
from .tokenizer import (
    WeightedToken,
    apply_token_weights,
    token_groups,
)

ENCODER_KEY = "llama"
TEXT_PREFIXES = ("text_encoders.llama.transformer.model.", "text_encoders.llama.model.", "model.")
HEAD_DIM = 128            # ComfyUI's Llama2Config (its files cannot tell heads from head width)
BOS_ID, PAD_ID = 128000, 128009   # <|begin_of_text|>, <|eot_id|> (ComfyUI's HiDream special tokens)
BOS_TOKEN, PAD_TOKEN = "<|begin_of_text|>", "<|eot_id|>"
MIN_LENGTH = 128          # ComfyUI's HiDream LLAMA3Tokenizer min_length
TOKENIZER_FOLDER = "llama_tokenizer"


def find_text_prefix(state: Mapping[str, Any]) -> str | None:
    """Where a Llama-style language model sits: post-attention norms, no Gemma feed-forward norms, no Qwen biases."""
    for prefix in TEXT_PREFIXES:
        if (f"{prefix}embed_tokens.weight" in state and f"{prefix}layers.0.post_attention_layernorm.weight" in state
                and f"{prefix}layers.0.pre_feedforward_layernorm.weight" not in state
                and f"{prefix}layers.0.self_attn.k_proj.bias" not in state):
            return prefix
    return None


def llama_config(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, Any]:
    """LlamaConfig arguments from the shapes, with ComfyUI's fixed head width, θ and ε."""
    vocab, hidden = state[f"{prefix}embed_tokens.weight"].shape
    layers = len({m.group(1) for key in state if (m := re.match(re.escape(prefix) + r"layers\.(\d+)\.", key))})
    q_rows = state[f"{prefix}layers.0.self_attn.q_proj.weight"].shape[0]
    kv_rows = state[f"{prefix}layers.0.self_attn.k_proj.weight"].shape[0]
    if q_rows % HEAD_DIM or kv_rows % HEAD_DIM or not kv_rows:
        raise ValueError(f"a Llama model whose attention ({q_rows} / {kv_rows} rows) is not in {HEAD_DIM}-wide heads")
    return {"vocab_size": int(vocab), "hidden_size": int(hidden), "num_hidden_layers": layers,
            "intermediate_size": int(state[f"{prefix}layers.0.mlp.gate_proj.weight"].shape[0]),
            "num_attention_heads": q_rows // HEAD_DIM, "num_key_value_heads": kv_rows // HEAD_DIM,
            "head_dim": HEAD_DIM, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 131072,
            "attention_bias": False, "mlp_bias": False}


def dequantized(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComfyUI's scaled-fp8 layout -> plain weights: `x.weight` · `x.scale_weight`, markers dropped."""
    if not any(key.endswith(".scale_weight") for key in state):
        return dict(state)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.endswith((".scale_weight", ".scale_input")) or key.rpartition(".")[2] == "scaled_fp8":
            continue
        scale = state.get(key[:-len("weight")] + "scale_weight") if key.endswith(".weight") else None
        out[key] = value.float() * scale.float() if scale is not None else value
    return out


def build_llama(state: Mapping[str, torch.Tensor], prefix: str, dtype: torch.dtype, what: str) -> torch.nn.Module:
    ensure_offline()
    from transformers import LlamaConfig, LlamaModel

    from .checkpoint import _materialize

    model = encoder_set.meta_text_model(LlamaModel, LlamaConfig(**llama_config(state, prefix)))
    weights = {key[len(prefix):]: value for key, value in dequantized(state).items() if key.startswith(prefix)}
    return _materialize(model, weights, dtype, what)


# Tokenizer ------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LlamaTokenizer:
    """Text -> Llama ids without special tokens (`encode`), and the BOS / pad ids."""

    source: str
    encode: Callable[[str], list[int]]
    bos_id: int = BOS_ID
    pad_id: int = PAD_ID


def tokenizer_folders(encoder_file: Path) -> tuple[Path, ...]:
    return encoder_set.tokenizer_folders(encoder_file, TOKENIZER_FOLDER)


@functools.lru_cache(maxsize=4)
def _json_tokenizer(path_text: str, mtime_ns: int, size: int) -> LlamaTokenizer:
    """(mtime and size are part of the cache key: a replaced file is read again.)"""
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(path_text)
    except Exception as error:  # the tokenizers library raises plain Exceptions on malformed files
        raise TokenizerUnavailable(f"{path_text}: not a readable tokenizer.json ({error})") from error
    bos, pad = tokenizer.token_to_id(BOS_TOKEN), tokenizer.token_to_id(PAD_TOKEN)
    return LlamaTokenizer(path_text, lambda text: tokenizer.encode(text, add_special_tokens=False).ids,
                          BOS_ID if bos is None else bos, PAD_ID if pad is None else pad)


def find_tokenizer(folders: Sequence[Path]) -> LlamaTokenizer:
    for folder in folders:
        path = folder / "tokenizer.json"
        if path.is_file():
            stat = path.stat()
            return _json_tokenizer(str(path), stat.st_mtime_ns, stat.st_size)
    where = ", ".join(str(f) for f in folders) or "(the clip was not loaded from a file)"
    raise TokenizerUnavailable(
        "HiDream's Llama prompts cannot be tokenized: no Llama 3 tokenizer.json (ComfyUI's "
        f"comfy/text_encoders/{TOKENIZER_FOLDER}/ or tokenizer_4/ of a diffusers HiDream repository) was found "
        "in: " + where)


def llama_tokenize(text: str, tokenizer: LlamaTokenizer, width: int | None = None, resolve_embedding: Any = None,
                   warn: Any = None, min_length: int = MIN_LENGTH) -> list[WeightedToken]:
    """[(token, weight), ...] as ComfyUI's HiDream LLAMA3Tokenizer makes them: BOS, each weighted segment's ids
    (embedding vectors for resolved `embedding:NAME`s), pads up to `min_length`."""
    tokens: list[WeightedToken] = [(tokenizer.bos_id, 1.0)]
    for group in token_groups(text, ENCODER_KEY, width, resolve_embedding, warn, tokenizer.encode, ENCODER_KEY):
        tokens += group
    return tokens + [(tokenizer.pad_id, 1.0)] * max(0, min_length - len(tokens))


def attention_mask(tokens: Sequence[WeightedToken], pad_id: int) -> torch.Tensor:
    """[1, T]: 1 before the first pad id, 0 from there (ComfyUI's SDClipModel with no end token)."""
    mask = torch.ones(1, len(tokens), dtype=torch.long)
    first_pad = next((i for i, (t, _) in enumerate(tokens) if isinstance(t, int) and t == pad_id), None)
    if first_pad is not None:
        mask[0, first_pad:] = 0
    return mask


def _all_layers(model: Any, tokens: Sequence[WeightedToken], pad_id: int) -> torch.Tensor:
    """[1, layers, T, D] float32 on the CPU: every layer's output, the last after the final norm. `model` is
    transformers' LlamaModel (Any: its submodules are read by name)."""
    embedding = model.get_input_embeddings()
    device = embedding.weight.device
    ids = torch.tensor([[t if isinstance(t, int) else pad_id for t, _ in tokens]], device=device)
    with torch.no_grad():
        embeds = embedding(ids).clone()
        for position, (token, _) in enumerate(tokens):
            if not isinstance(token, int):
                embeds[0, position] = token.to(embeds)
        output = model(inputs_embeds=embeds, attention_mask=attention_mask(tokens, pad_id).to(device),
                       output_hidden_states=True)
    return torch.stack(output.hidden_states[1:], dim=1).float().cpu()


def encode_llama(model: torch.nn.Module, tokens: Sequence[WeightedToken], bos_id: int = BOS_ID,
                 pad_id: int = PAD_ID) -> torch.Tensor:
    """The Llama conditioning [1, layers, T, D] with the token-weight rule."""
    tokens = list(tokens) or [(bos_id, 1.0)]
    return apply_token_weights(_all_layers(model, tokens, pad_id), tokens, lambda: _all_layers(
        model, [(bos_id, 1.0)] + [(pad_id, 1.0)] * (len(tokens) - 1), pad_id), token_axis=2)
