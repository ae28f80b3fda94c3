"""T5 encoders (T5-XXL of SD3 / Flux) from ComfyUI's text-encoder files, as transformers' T5EncoderModel.

The files use transformers' own names (`shared.weight`, `encoder.block.N.layer.M...`, `encoder.final_layer_norm`),
sometimes under a checkpoint prefix (`text_encoders.t5xxl.transformer.` in SD3 all-in-one files). Everything the
config needs is in the shapes: width (shared), depth (block count), heads (the relative-attention bias table),
head width (q rows / heads), feed-forward width and style (gated `wi_0`/`wi_1` = T5 v1.1 gated-gelu, one `wi` =
original T5 relu).

Tokenization: T5's SentencePiece vocabulary is not shipped with this engine (no package on PyPI carries it), so
the user provides it as a folder `t5_tokenizer/` holding `tokenizer.json` (what transformers' T5TokenizerFast and
ComfyUI's bundled comfy/text_encoders/t5_tokenizer/ use; read with the `tokenizers` library) or `spiece.model`
(needs the `sentencepiece` package). It is looked for beside the T5 file and in the models folders above it
(`models/text_encoders/t5_tokenizer/`, `models/clip/t5_tokenizer/`); see `tokenizer_search_dirs`.
Prompts are tokenized as ComfyUI's T5XXLTokenizer does: weighted segments each tokenized on their own without
the EOS, one EOS at the end, padded with id 0 to the family's minimum length, no truncation and no chunks.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch

from .offline import ensure_offline
from .tokenizer import (
    EmbeddingResolver,
    Warn,
    WeightedToken,
    apply_token_weights,
    token_groups,
)

T5_PREFIXES = ("text_encoders.t5xxl.transformer.", "text_encoders.t5xxl.", "")
T5_RELATIVE_BIAS = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"


T5_TOKENIZER_FOLDER = "t5_tokenizer"
T5_TOKENIZER_FILES = ("tokenizer.json", "spiece.model")
T5_EOS_ID = 1  # "</s>"
T5_PAD_ID = 0  # "<pad>": ComfyUI pads T5 prompts with 0 (pad_with_end=False)
# How many folders above the T5 file are searched for models/<text_encoders|clip>/t5_tokenizer.
_SEARCH_DEPTH = 3


class NotT5(ValueError):
    """The weights hold no T5 encoder."""


class TokenizerUnavailable(RuntimeError):
    """Prompt text cannot be tokenized for one of the clip's encoders."""


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


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer


def tokenizer_search_dirs(t5_file: Path) -> tuple[Path, ...]:
    """Where a T5 file's tokenizer folder is looked for, in order: `t5_tokenizer/` beside the file, then
    `t5_tokenizer/`, `text_encoders/t5_tokenizer/` and `clip/t5_tokenizer/` in the folders above it (so
    models/text_encoders/t5_tokenizer/ serves files anywhere under models/)."""
    found: list[Path] = []
    folder = t5_file.resolve().parent
    for level in range(_SEARCH_DEPTH + 1):
        candidates = [folder / T5_TOKENIZER_FOLDER]
        if level:
            candidates += [folder / "text_encoders" / T5_TOKENIZER_FOLDER, folder / "clip" / T5_TOKENIZER_FOLDER]
        found += [c for c in candidates if c not in found]
        if folder.parent == folder:
            break
        folder = folder.parent
    return tuple(found)


@dataclass(frozen=True)
class T5Tokenizer:
    """Text -> T5 ids without special tokens (`encode`), from a tokenizer.json or spiece.model file."""

    path: Path
    encode: Callable[[str], list[int]]
    eos_id: int


def _missing_message(dirs: Sequence[Path]) -> str:
    where = "\n  ".join(str(d) for d in dirs) or "(no folder: the clip was not loaded from a file)"
    return ("T5 prompts cannot be tokenized: no T5 SentencePiece tokenizer (tokenizer.json or spiece.model) was "
            f"found. Put T5's tokenizer files (e.g. ComfyUI's comfy/text_encoders/t5_tokenizer/ folder, or "
            f"tokenizer_2/ of a diffusers Flux / SD3 repository) in one of:\n  {where}")


def find_t5_tokenizer(dirs: Sequence[Path]) -> T5Tokenizer:
    """The first tokenizer found in `dirs`; TokenizerUnavailable naming every folder looked in otherwise."""
    for folder in dirs:
        for name in T5_TOKENIZER_FILES:
            path = folder / name
            if path.is_file():
                stat = path.stat()
                return _load_tokenizer(str(path), stat.st_mtime_ns, stat.st_size)
    raise TokenizerUnavailable(_missing_message(dirs))


@functools.lru_cache(maxsize=4)
def _load_tokenizer(path_text: str, mtime_ns: int, size: int) -> T5Tokenizer:
    """(mtime and size are part of the cache key: a replaced file is read again.)"""
    path = Path(path_text)
    if path.suffix == ".json":
        from tokenizers import Tokenizer

        try:
            tokenizer = Tokenizer.from_file(path_text)
        except Exception as error:  # the tokenizers library raises plain Exceptions on malformed files
            raise TokenizerUnavailable(f"{path}: not a readable tokenizer.json ({error})") from error
        eos = tokenizer.token_to_id("</s>")
        return T5Tokenizer(path, lambda text: tokenizer.encode(text, add_special_tokens=False).ids,
                           T5_EOS_ID if eos is None else eos)
    try:
        import sentencepiece
    except ImportError as error:
        raise TokenizerUnavailable(f"{path}: reading spiece.model needs the sentencepiece package (pip install "
                                   f"sentencepiece), or put T5's tokenizer.json in that folder instead") from error
    try:
        processor = sentencepiece.SentencePieceProcessor(model_file=path_text)
    except (OSError, RuntimeError) as error:
        raise TokenizerUnavailable(f"{path}: not a readable SentencePiece model ({error})") from error
    eos = processor.eos_id()
    return T5Tokenizer(path, lambda text: list(processor.encode(text)), T5_EOS_ID if eos < 0 else eos)


def t5_tokenize(text: str, tokenizer: T5Tokenizer, min_length: int, min_padding: int = 0, width: int | None = None,
                resolve_embedding: EmbeddingResolver | None = None, warn: Warn | None = None) \
        -> list[WeightedToken]:
    """A prompt as ComfyUI's T5XXLTokenizer makes it: [(token, weight), ...] = the weighted segments' tokens,
    EOS, then `min_padding` pads and pads up to `min_length` (id 0). Tokens may be embedding vectors [width]."""
    tokens: list[WeightedToken] = []
    for group in token_groups(text, "t5xxl", width, resolve_embedding, warn, tokenizer.encode, "t5xxl"):
        tokens += group
    tokens.append((tokenizer.eos_id, 1.0))
    tokens += [(T5_PAD_ID, 1.0)] * max(0, min_padding)
    tokens += [(T5_PAD_ID, 1.0)] * max(0, min_length - len(tokens))
    return tokens


def encode_t5_weighted(module: torch.nn.Module, tokens: Sequence[WeightedToken]) -> torch.Tensor:
    """T5's last hidden state [1, T, D] (float32, CPU) for weighted tokens, with ComfyUI's weight rule: a token
    of weight w becomes (z - z_empty)·w + z_empty, z_empty the output for [EOS, pad, ...] of the same length."""
    if not tokens:
        tokens = [(T5_EOS_ID, 1.0)]
    ids = torch.tensor([[t if isinstance(t, int) else T5_PAD_ID for t, _ in tokens]])
    vectors = [(i, t) for i, (t, _) in enumerate(tokens) if not isinstance(t, int)]
    if vectors:
        embedding = cast(Any, module).get_input_embeddings()
        with torch.no_grad():
            embeds = embedding(ids.to(embedding.weight.device)).clone()
        for position, vector in vectors:
            embeds[0, position] = vector.to(embeds)
        z = _encode_embeds(module, embeds)
    else:
        z = encode_t5(module, ids)
    return apply_token_weights(z, tokens, lambda: encode_t5(
        module, torch.tensor([[T5_EOS_ID] + [T5_PAD_ID] * (len(tokens) - 1)])))


def _encode_embeds(module: torch.nn.Module, embeds: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return module(inputs_embeds=embeds).last_hidden_state.float().cpu()
