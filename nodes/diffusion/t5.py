"""T5 encoders (T5-XXL of SD3 / Flux) from ComfyUI's text-encoder files, as transformers' T5EncoderModel.

The files use transformers' own names (`shared.weight`, `encoder.block.N.layer.M...`, `encoder.final_layer_norm`),
sometimes under a checkpoint prefix (`text_encoders.t5xxl.transformer.` in SD3 all-in-one files). Everything the
config needs is in the shapes: width (shared), depth (block count), heads (the relative-attention bias table),
head width (q rows / heads), feed-forward width and style (gated `wi_0`/`wi_1` = T5 v1.1 gated-gelu, one `wi` =
original T5 relu).

Tokenization: T5's SentencePiece vocabulary (spiece.model / tokenizer.json) is not shipped with this engine or any
installed package, so prompts cannot be turned into T5 ids offline; the encoder runs on token ids given to it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from .offline import ensure_offline

T5_PREFIXES = ("text_encoders.t5xxl.transformer.", "text_encoders.t5xxl.", "")
T5_RELATIVE_BIAS = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"


class NotT5(ValueError):
    """The weights hold no T5 encoder."""


def find_t5_prefix(state: Mapping[str, Any]) -> str | None:
    for prefix in T5_PREFIXES:
        if f"{prefix}encoder.block.0.layer.0.SelfAttention.q.weight" in state:
            return prefix
    return None


def t5_config(state: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, Any]:
    """T5Config keyword arguments read from T5 encoder weights under `prefix`."""
    def tensor(name: str) -> torch.Tensor:
        key = prefix + name
        if key not in state:
            raise NotT5(f"no {name} in the T5 weights")
        return state[key]

    embedding = state.get(prefix + "shared.weight", state.get(prefix + "encoder.embed_tokens.weight"))
    if embedding is None:
        raise NotT5("no token embedding (shared.weight) in the T5 weights")
    regex = re.compile(re.escape(prefix) + r"encoder\.block\.(\d+)\.")
    depth = len({int(m.group(1)) for key in state if (m := regex.match(key))})
    bias = tensor(T5_RELATIVE_BIAS)
    heads = bias.shape[1]
    inner = tensor("encoder.block.0.layer.0.SelfAttention.q.weight").shape[0]
    gated = prefix + "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in state
    feed_forward = tensor("encoder.block.0.layer.1.DenseReluDense." + ("wi_0.weight" if gated else "wi.weight"))
    return {
        "vocab_size": embedding.shape[0],
        "d_model": embedding.shape[1],
        "d_kv": inner // heads,
        "d_ff": feed_forward.shape[0],
        "num_layers": depth,
        "num_heads": heads,
        "relative_attention_num_buckets": bias.shape[0],
        "feed_forward_proj": "gated-gelu" if gated else "relu",
        "is_encoder_decoder": False,
        "use_cache": False,
        "tie_word_embeddings": False,
    }


def t5_weights(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The encoder's tensors in T5EncoderModel names: the prefix stripped, both embedding names filled in."""
    weights = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)
               and (key[len(prefix):].startswith("encoder.") or key[len(prefix):] == "shared.weight")}
    embedding = weights.get("shared.weight", weights.get("encoder.embed_tokens.weight"))
    if embedding is not None:
        weights.setdefault("shared.weight", embedding)
        weights.setdefault("encoder.embed_tokens.weight", embedding)
    return weights


def t5_encoder_model(config: Mapping[str, Any]) -> torch.nn.Module:
    """An empty (meta-device) transformers T5EncoderModel for the config."""
    ensure_offline()
    from transformers import T5Config, T5EncoderModel

    with torch.device("meta"):
        return T5EncoderModel(T5Config(**config))


def encode_t5(module: torch.nn.Module, token_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) \
        -> torch.Tensor:
    """The last hidden state [B, T, D] (float32, on the CPU) of a T5 encoder for token ids [B, T]."""
    device = next(module.parameters()).device
    with torch.no_grad():
        output = module(input_ids=token_ids.to(device),
                        attention_mask=None if attention_mask is None else attention_mask.to(device))
    return output.last_hidden_state.float().cpu()
