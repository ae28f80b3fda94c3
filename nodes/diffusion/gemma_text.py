"""Lumina 2's text encoder: Gemma-2-2B as ComfyUI's CLIPLoader type "lumina2" uses it (comfy/text_encoders/lumina2.py).

The file (`gemma_2_2b.safetensors`, or `text_encoders.gemma2_2b.transformer.` in all-in-one checkpoints) holds
the language model under `model.` (embed_tokens, layers.N.*, norm) and, in ComfyUI's own files, its SentencePiece
vocabulary as a uint8 tensor `spiece_model`. The network is transformers' Gemma2Model with ComfyUI's numerics:
256-wide heads scaled by 1/√256, full causal attention in every layer (ComfyUI implements neither Gemma 2's
attention-logit soft-capping nor its sliding window), embeddings scaled by √width, (1 + w) RMS norms.

Encoding (ComfyUI's Gemma2_2BModel): the hidden states after layer −2 (CLIPSetLastLayer moves it), without the
final norm; no pooled output. Tokens are the BOS id followed by each weighted segment's ids (no end token, no
padding); the attention mask covers the tokens up to the first pad id (0). Token weights follow ComfyUI's rule
z' = (z − z_empty)·w + z_empty, z_empty the encoding of [BOS, pad, ...] of the same length.

Tokenizer, in this order: the file's `spiece_model` (read with transformers' SentencePiece-to-`tokenizers`
conversion, which needs the protobuf package), else a `tokenizer.json` (Gemma's, as in a diffusers Lumina 2
repository's tokenizer/ folder) in `<file stem>_tokenizer/` or `gemma_tokenizer/` beside the file, or in
`text_encoders/gemma_tokenizer/` of the models folder. Without any, tokenize raises TokenizerUnavailable.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch

from . import encoder_set
from .encoder_set import EncoderSet
from .family_clip import TokenizerUnavailable
from .offline import ensure_offline
from .tokenizer import (
    WeightedToken,
    apply_token_weights,
    token_groups,
)

ENCODER_KEY = "gemma2_2b"
TEXT_PREFIXES = ("text_encoders.gemma2_2b.transformer.model.", "text_encoders.gemma2_2b.model.", "model.")
SPIECE_KEYS = ("spiece_model", "text_encoders.gemma2_2b.spiece_model",
               "text_encoders.gemma2_2b.transformer.spiece_model")
HEAD_DIM = 256           # ComfyUI's Gemma2_2B_Config (its files cannot tell heads from head width)
DEFAULT_LAYER = -2       # ComfyUI's Gemma2_2BModel layer_idx
BOS_ID, PAD_ID = 2, 0    # Gemma's <bos> and <pad> (ComfyUI's special_tokens start / pad)
TOKENIZER_FOLDER = "gemma_tokenizer"


def find_text_prefix(state: Mapping[str, Any]) -> str | None:
    """Where a Gemma 2 language model sits (its pre/post feed-forward norms set it apart from Llama-style ones)."""
    return next((p for p in TEXT_PREFIXES if f"{p}embed_tokens.weight" in state
                 and f"{p}layers.0.pre_feedforward_layernorm.weight" in state), None)


def gemma_config(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, Any]:
    """Gemma2Config arguments from the shapes, with ComfyUI's fixed head width, θ, ε and attention."""
    if f"{prefix}layers.0.self_attn.q_norm.weight" in state:
        raise ValueError("a Gemma 3 text encoder (per-head q/k norms); Lumina 2 uses Gemma 2")
    vocab, hidden = state[f"{prefix}embed_tokens.weight"].shape
    layers = len({m.group(1) for key in state if (m := re.match(re.escape(prefix) + r"layers\.(\d+)\.", key))})
    q_rows = state[f"{prefix}layers.0.self_attn.q_proj.weight"].shape[0]
    kv_rows = state[f"{prefix}layers.0.self_attn.k_proj.weight"].shape[0]
    if q_rows % HEAD_DIM or kv_rows % HEAD_DIM or not kv_rows:
        raise ValueError(f"a Gemma 2 model whose attention ({q_rows} / {kv_rows} rows) is not in {HEAD_DIM}-wide heads")
    return {"vocab_size": int(vocab), "hidden_size": int(hidden), "num_hidden_layers": layers,
            "intermediate_size": int(state[f"{prefix}layers.0.mlp.gate_proj.weight"].shape[0]),
            "num_attention_heads": q_rows // HEAD_DIM, "num_key_value_heads": kv_rows // HEAD_DIM,
            "head_dim": HEAD_DIM, "query_pre_attn_scalar": HEAD_DIM, "rms_norm_eps": 1e-6,
            "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 8192,
            "attn_logit_softcapping": None, "final_logit_softcapping": None,
            "layer_types": ["full_attention"] * layers, "pad_token_id": PAD_ID, "bos_token_id": BOS_ID}


def build_gemma(state: Mapping[str, torch.Tensor], prefix: str, dtype: torch.dtype, what: str) -> torch.nn.Module:
    ensure_offline()
    from transformers import Gemma2Config, Gemma2Model

    from .checkpoint import _materialize

    config = Gemma2Config(**gemma_config(state, prefix))
    model = encoder_set.meta_text_model(Gemma2Model, config)
    model.embed_tokens.embed_scale = torch.nn.Buffer(torch.tensor(config.hidden_size ** 0.5), persistent=False)
    weights = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
    return _materialize(model, weights, dtype, what)


# Tokenizer ------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GemmaTokenizer:
    """Text -> Gemma ids without special tokens (`encode`), and the BOS id to start with."""

    source: str
    encode: Callable[[str], list[int]]
    bos_id: int


def tokenizer_folders(encoder_file: Path) -> tuple[Path, ...]:
    return encoder_set.tokenizer_folders(encoder_file, TOKENIZER_FOLDER)


def spiece_tokenizer(model_proto: bytes, source: str) -> GemmaTokenizer:
    """A tokenizer from SentencePiece model bytes (ComfyUI's `spiece_model` tensor)."""
    ensure_offline()
    try:
        from transformers.convert_slow_tokenizer import SpmConverter, import_protobuf

        proto = import_protobuf().ModelProto()
        build = SpmConverter.build_tokenizer_from_spm_proto
    except (ImportError, AttributeError) as error:
        raise TokenizerUnavailable(
            f"{source}: reading its SentencePiece vocabulary needs the protobuf package (pip install protobuf) and "
            f"transformers ≥ 5; or put Gemma's tokenizer.json in a {TOKENIZER_FOLDER}/ folder beside it") from error
    try:
        proto.ParseFromString(model_proto)
        vocab = {piece.piece: index for index, piece in enumerate(proto.pieces)}
        tokenizer = build(proto, vocab, legacy=False)
    except Exception as error:  # protobuf's DecodeError and the tokenizers library's plain Exceptions
        raise TokenizerUnavailable(f"{source}: its spiece_model is not a readable SentencePiece model ({error})") \
            from error
    if tokenizer is None:
        raise TokenizerUnavailable(f"{source}: its spiece_model is neither a BPE nor a unigram SentencePiece model")
    bos = proto.trainer_spec.bos_id
    return GemmaTokenizer(source, lambda text: tokenizer.encode(text, add_special_tokens=False).ids,
                          BOS_ID if bos < 0 else bos)


@functools.lru_cache(maxsize=4)
def _json_tokenizer(path_text: str, mtime_ns: int, size: int) -> GemmaTokenizer:
    """(mtime and size are part of the cache key: a replaced file is read again.)"""
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(path_text)
    except Exception as error:  # the tokenizers library raises plain Exceptions on malformed files
        raise TokenizerUnavailable(f"{path_text}: not a readable tokenizer.json ({error})") from error
    bos = tokenizer.token_to_id("<bos>")
    return GemmaTokenizer(path_text, lambda text: tokenizer.encode(text, add_special_tokens=False).ids,
                          BOS_ID if bos is None else bos)


def find_tokenizer(folders: Sequence[Path]) -> GemmaTokenizer:
    for folder in folders:
        path = folder / "tokenizer.json"
        if path.is_file():
            stat = path.stat()
            return _json_tokenizer(str(path), stat.st_mtime_ns, stat.st_size)
    where = ", ".join(str(f) for f in folders) or "(the clip was not loaded from a file)"
    raise TokenizerUnavailable(
        "Lumina 2 prompts cannot be tokenized: the Gemma text-encoder file carries no SentencePiece vocabulary "
        "(spiece_model; ComfyUI's own gemma_2_2b files do) and no Gemma tokenizer.json was found in: " + where)


def gemma_tokenize(text: str, tokenizer: GemmaTokenizer, width: int | None = None, resolve_embedding: Any = None,
                   warn: Any = None) -> list[WeightedToken]:
    """[(token, weight), ...] as ComfyUI's Gemma2BTokenizer makes them: BOS, then each weighted segment's ids
    (embedding vectors for resolved `embedding:NAME`s), no end token, no padding."""
    tokens: list[WeightedToken] = [(tokenizer.bos_id, 1.0)]
    for group in token_groups(text, ENCODER_KEY, width, resolve_embedding, warn, tokenizer.encode, ENCODER_KEY):
        tokens += group
    return tokens


def attention_mask(tokens: Sequence[WeightedToken]) -> torch.Tensor:
    """[1, T]: 1 up to (not including) the first pad id, 0 from there (ComfyUI's SDClipModel with no end token)."""
    mask = torch.ones(1, len(tokens))
    first_pad = next((i for i, (t, _) in enumerate(tokens) if isinstance(t, int) and t == PAD_ID), None)
    if first_pad is not None:
        mask[0, first_pad:] = 0
    return mask


def _as_weighted(given: Any) -> list[WeightedToken]:
    if isinstance(given, torch.Tensor):
        return [(int(t), 1.0) for t in given.reshape(-1)]
    return [item if isinstance(item, tuple) else (int(item), 1.0) for item in given]


def _hidden_after(model: Any, tokens: Sequence[WeightedToken], layer: int) -> torch.Tensor:
    """The output of layer `layer` (negative: from the end) for weighted tokens, float32 on the CPU. `model` is
    transformers' Gemma2Model (Any: its submodules are read by name)."""
    embedding = model.get_input_embeddings()
    device = embedding.weight.device
    ids = torch.tensor([[t if isinstance(t, int) else PAD_ID for t, _ in tokens]], device=device)
    layers = model.layers
    captured: list[torch.Tensor] = []
    handle = None
    if -len(layers) <= layer < len(layers):  # ComfyUI reads a layer beyond the depth as the final, normed output
        handle = layers[layer].register_forward_hook(
            lambda module, args, output: captured.append(output[0] if isinstance(output, tuple) else output))
    try:
        with torch.no_grad():
            embeds = embedding(ids).clone()  # Gemma's embedding scales by √width; so are the vectors put in
            scale = getattr(embedding, "embed_scale", None)
            for position, (token, _) in enumerate(tokens):
                if not isinstance(token, int):
                    embeds[0, position] = token.to(embeds) * (1.0 if scale is None else scale.to(embeds))
            output = model(inputs_embeds=embeds,
                           attention_mask=attention_mask(tokens).to(device=device, dtype=torch.long))
    finally:
        if handle is not None:
            handle.remove()
    return (captured[0] if captured else output.last_hidden_state).float().cpu()


def encode_gemma(model: torch.nn.Module, tokens: Sequence[WeightedToken], layer: int = DEFAULT_LAYER) -> torch.Tensor:
    """The conditioning [1, T, D] with ComfyUI's token-weight rule."""
    tokens = list(tokens) or [(BOS_ID, 1.0)]
    return apply_token_weights(_hidden_after(model, tokens, layer), tokens, lambda: _hidden_after(
        model, [(BOS_ID, 1.0)] + [(PAD_ID, 1.0)] * (len(tokens) - 1), layer))


@dataclass(frozen=True, eq=False)
class Lumina2Clip(EncoderSet):
    """What a CLIP link carries for Lumina 2: the Gemma 2 model and where its tokenizer comes from."""

    encoders: torch.nn.ModuleDict
    spiece_model: bytes | None = None        # the file's SentencePiece vocabulary, when it carries one
    tokenizer_dirs: tuple[Path, ...] = ()
    family: str = "lumina2"
    layer_idx: int | None = None             # CLIPSetLastLayer: which layer's output (default −2)
    patches: tuple[Any, ...] = ()
    source: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    _tokenizer: list[GemmaTokenizer] = field(default_factory=list, repr=False)  # loaded once, shared by clones

    def tokenizer(self) -> GemmaTokenizer:
        if not self._tokenizer:
            if self.spiece_model is not None:
                self._tokenizer.append(spiece_tokenizer(self.spiece_model, Path(self.source).name or "the file"))
            else:
                self._tokenizer.append(find_tokenizer(self.tokenizer_dirs))
        return self._tokenizer[0]

    def tokenize(self, text: str, resolve_embedding: Any = None, warn: Any = None) -> dict[str, Any]:
        width = cast(Any, self.encoders[ENCODER_KEY]).get_input_embeddings().weight.shape[1]
        return {ENCODER_KEY: gemma_tokenize(text, self.tokenizer(), width, resolve_embedding, warn)}

    def encode_tokens(self, tokens: Mapping[str, Any], manager: Any = None) -> tuple[torch.Tensor, None]:
        """(cond [1, T, D] float32 on the CPU, no pooled output)."""
        given = tokens.get(ENCODER_KEY)
        weighted = _as_weighted(given) if given is not None else [(BOS_ID, 1.0)]
        layer = self.layer_idx if self.layer_idx is not None else DEFAULT_LAYER
        with self.prepared(manager) as modules:
            return encode_gemma(modules[ENCODER_KEY], weighted, layer), None


def _spiece_bytes(state: Mapping[str, torch.Tensor]) -> bytes | None:
    tensor = next((state[key] for key in SPIECE_KEYS if key in state), None)
    return None if tensor is None else tensor.to(torch.uint8).reshape(-1).numpy().tobytes()


def load_lumina2_clip(paths: list[Path], dtype: torch.dtype) -> Lumina2Clip:
    """CLIPLoader type "lumina2": one Gemma-2-2B file."""
    from .checkpoint import ModelFileError, read_state_dict
    from .families import describe_keys

    if len(paths) != 1:
        raise ModelFileError("a lumina2 CLIP is one Gemma 2 file")
    path = paths[0]
    state = read_state_dict(path)
    return _clip_from_state(state, dtype, path, ModelFileError, describe_keys)


def _clip_from_state(state: Mapping[str, torch.Tensor], dtype: torch.dtype, path: Path, error: type[Exception],
                     describe: Callable[[Mapping[str, Any]], str]) -> Lumina2Clip:
    prefix = find_text_prefix(state)
    if prefix is None:
        raise error(f"{path.name}: not a Gemma 2 text encoder (no model.embed_tokens / pre_feedforward_layernorm); "
                    f"found {describe(state)}")
    try:
        model = build_gemma(state, prefix, dtype, path.name)
    except ValueError as failure:
        if isinstance(failure, error):
            raise
        raise error(f"{path.name}: {failure}") from failure
    return Lumina2Clip(encoders=torch.nn.ModuleDict({ENCODER_KEY: model}), spiece_model=_spiece_bytes(state),
                       tokenizer_dirs=tokenizer_folders(path), source=str(path))


def checkpoint_clip(state: Mapping[str, torch.Tensor], dtype: torch.dtype, path: Path) -> Lumina2Clip | None:
    """The Gemma 2 encoder an all-in-one Lumina 2 file carries under text_encoders.gemma2_2b., or None."""
    from .checkpoint import ModelFileError
    from .families import describe_keys

    if find_text_prefix(state) not in TEXT_PREFIXES[:2]:
        return None
    return _clip_from_state(state, dtype, path, ModelFileError, describe_keys)
