"""CLIP tokenisation with ComfyUI's prompt syntax: weights, embeddings, 77-token chunks.

The BPE vocabulary ships in `data/` (OpenAI CLIP's `bpe_simple_vocab_16e6.txt.gz`, MIT), so nothing is ever
fetched. The pipeline for one prompt is:

1. `parse_prompt_weights(text)` splits the text into (segment, weight) pairs: `(x)` multiplies by 1.1 (nested
   1.21, ...), `(x:1.3)` sets the weight, `\\(` `\\)` are literal parentheses. There is no `[x]` de-emphasis.
2. Each segment is BPE-encoded on its own (merges never span segment boundaries); `embedding:NAME` words are
   replaced by the vectors an embedding resolver returns (see `EmbeddingResolver`).
3. `chunk_tokens` packs the token groups into chunks of exactly 77: [BOS] + at most 75 tokens + [EOS] + padding.
   A group that would overflow is split when it has 8 or more tokens, otherwise it moves whole to the next chunk.
"""

from __future__ import annotations

import functools
import gzip
import json
import logging
import re
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .offline import ensure_offline

log = logging.getLogger(__name__)

DATA_DIR = Path(__file__).resolve().parent / "data"
BPE_VOCAB_FILE = DATA_DIR / "bpe_simple_vocab_16e6.txt.gz"
TOKENIZER_CONFIG_FILE = DATA_DIR / "clip_tokenizer_config.json"

BOS_ID = 49406
EOS_ID = 49407
BANG_ID = 0  # "!" : the padding token of the OpenCLIP encoders (SD2 clip_h, SDXL clip_g)
CHUNK_LENGTH = 77
# Token groups at least this long may be split across chunks; shorter ones move whole to the next chunk.
MAX_WORD_LENGTH = 8
EMBEDDING_PREFIX = "embedding:"

# Escaped parentheses are swapped for control characters while the weights are parsed.
_ESCAPED_CLOSE, _ESCAPED_OPEN = "\0\1", "\0\2"

# A token: a vocabulary id, or one embedding vector [D] (a textual-inversion token).
Token = int | torch.Tensor
WeightedToken = tuple[Token, float]
Chunk = list[WeightedToken]

# resolve_embedding(name) -> the embedding's vectors, or None when there is no such embedding. The value is a
# tensor [n, D] (or [D]) used by every encoder of width D, or a mapping from encoder key ("l", "g", "h", or the
# file keys "clip_l", "clip_g", "clip_h") to such a tensor for multi-encoder (SDXL) embedding files.
EmbeddingResolver = Callable[[str], torch.Tensor | Mapping[str, torch.Tensor] | None]
Warn = Callable[[str], None]


@dataclass(frozen=True)
class ChunkFormat:
    """How one text encoder's token chunks are framed."""

    pad_id: int = EOS_ID
    bos_id: int = BOS_ID
    eos_id: int = EOS_ID
    length: int = CHUNK_LENGTH
    max_word_length: int = MAX_WORD_LENGTH


SD1_CHUNKS = ChunkFormat(pad_id=EOS_ID)        # openai CLIP-L (SD1, and SDXL's clip_l)
OPENCLIP_CHUNKS = ChunkFormat(pad_id=BANG_ID)  # SD2 clip_h, SDXL clip_g


# ---------------------------------------------------------------------------------------------------------------
# Vocabulary and the BPE tokenizer


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins for raw bytes used by byte-level BPE, in vocabulary order: the bytes that are
    already printable keep their own character; the others are mapped to code points from 256 upwards."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    printable_set = set(printable)
    others = [b for b in range(256) if b not in printable_set]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(others))]


def _load_merges(path: Path, merge_count: int) -> list[tuple[str, str]]:
    lines = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")
    # Line 0 is a version header; CLIP uses the first `merge_count` merges after it.
    merges = [tuple(line.split()) for line in lines[1:1 + merge_count]]
    if len(merges) != merge_count or any(len(pair) != 2 for pair in merges):
        raise ValueError(f"{path}: expected {merge_count} BPE merge lines")
    return merges  # type: ignore[return-value]


def build_clip_vocab(path: Path = BPE_VOCAB_FILE, merge_count: int = 48894) -> tuple[dict[str, int], list]:
    """CLIP's vocabulary (49408 entries) and merge list, derived from the BPE merges file."""
    merges = _load_merges(path, merge_count)
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(pair) for pair in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(tokens)}, merges


@functools.cache
def clip_tokenizer():
    """The CLIP BPE tokenizer (transformers' CLIPTokenizer, built in memory from the shipped files; no hub)."""
    ensure_offline()
    from transformers import CLIPTokenizer

    config = json.loads(TOKENIZER_CONFIG_FILE.read_text())
    vocab, merges = build_clip_vocab(BPE_VOCAB_FILE, int(config.pop("merge_count")))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, **config)
    if tokenizer.bos_token_id != BOS_ID or tokenizer.eos_token_id != EOS_ID:
        raise RuntimeError("CLIP vocabulary mismatch: special token ids are not 49406/49407")
    return tokenizer


# CJK ideograph blocks: each such character is a word of its own before BPE.
_CJK_RANGES = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
               (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))


def _is_cjk(code: int) -> bool:
    return any(low <= code <= high for low, high in _CJK_RANGES)


def clean_text(text: str) -> str:
    """The text clean-up of the CLIP tokenizer ComfyUI runs (transformers' Python CLIPTokenizer without ftfy): drop
    control characters, NUL and U+FFFD, make other whitespace a space, and set CJK ideographs apart as words. The
    tokenizers-backed CLIPTokenizer skips this step; everything else (NFC, lowercase, the split regex) is shared."""
    out = []
    for char in text:
        code = ord(char)
        if char in " \t\n\r" or unicodedata.category(char) == "Zs":
            out.append(" ")
        elif code == 0 or code == 0xFFFD or unicodedata.category(char).startswith("C"):
            continue
        elif _is_cjk(code):
            out.append(f" {char} ")
        else:
            out.append(char)
    return "".join(out)


def bpe_ids(text: str) -> list[int]:
    """Token ids of a piece of text, without BOS/EOS."""
    text = clean_text(text)
    if not text.strip():
        return []
    return list(clip_tokenizer()(text, add_special_tokens=False)["input_ids"])


# ---------------------------------------------------------------------------------------------------------------
# Weight syntax


def _split_top_level(text: str) -> list[str]:
    """Split at top-level parenthesised groups, keeping the parentheses: "a (b (c)) d" -> ["a ", "(b (c))", " d"].

    Mirrors ComfyUI's scanner exactly, including its handling of unbalanced input: a stray ")" at the top level
    drives the depth negative and stays literal text, and an unclosed "(" leaves its group as plain text.
    """
    parts: list[str] = []
    current = ""
    depth = 0
    for char in text:
        if char == "(":
            if depth == 0:
                if current:
                    parts.append(current)
                current = "("
            else:
                current += char
            depth += 1
        elif char == ")":
            depth -= 1
            if depth == 0:
                parts.append(current + ")")
                current = ""
            else:
                current += char
        else:
            current += char
    if current:
        parts.append(current)
    return parts


def _group_weight(inner: str, outer_weight: float) -> tuple[str, float]:
    """The text and weight of a "(...)" group's contents: ×1.1, or the number after the last ':' when there is
    one (not at the start) and it parses as a float."""
    colon = inner.rfind(":")
    if colon > 0:
        try:
            return inner[:colon], float(inner[colon + 1:])
        except ValueError:
            pass
    return inner, outer_weight * 1.1


def parse_prompt_weights(text: str, weight: float = 1.0) -> list[tuple[str, float]]:
    """(segment, weight) pairs in prompt order, escapes already resolved to literal parentheses."""
    escaped = text.replace("\\)", _ESCAPED_CLOSE).replace("\\(", _ESCAPED_OPEN)
    segments: list[tuple[str, float]] = []
    # A stack of (text, weight, is_group) in reverse order, so nested groups expand in place without recursion.
    pending: list[tuple[str, float, bool]] = [(escaped, weight, True)]
    while pending:
        piece, piece_weight, is_group = pending.pop()
        if not is_group:
            segments.append((piece, piece_weight))
            continue
        expanded: list[tuple[str, float, bool]] = []
        for part in _split_top_level(piece):
            if len(part) >= 2 and part[0] == "(" and part[-1] == ")":
                inner, inner_weight = _group_weight(part[1:-1], piece_weight)
                expanded.append((inner, inner_weight, True))
            else:
                expanded.append((part, piece_weight, False))
        pending.extend(reversed(expanded))
    return [(segment.replace(_ESCAPED_CLOSE, ")").replace(_ESCAPED_OPEN, "("), w) for segment, w in segments]


# ---------------------------------------------------------------------------------------------------------------
# Embeddings and token groups


def _split_embedding_words(segment: str) -> list[str]:
    """Split a segment before each " embedding:" / "\\nembedding:" so that every embedding reference starts a
    piece of its own (the separator's whitespace is dropped)."""
    pieces = re.split(r"[ \n]" + re.escape(EMBEDDING_PREFIX), segment)
    out = [pieces[0]] + [EMBEDDING_PREFIX + piece for piece in pieces[1:]]
    return [piece for piece in out if piece]


def select_embedding_vectors(value: Any, encoder_key: str, width: int) -> torch.Tensor | None:
    """The [n, width] vectors of a resolved embedding for one encoder, or None when it has none of that width."""
    if isinstance(value, Mapping):
        value = value.get(encoder_key, value.get(f"clip_{encoder_key}"))
    if not isinstance(value, torch.Tensor):
        return None
    vectors = value.reshape(-1, value.shape[-1]) if value.dim() != 1 else value[None]
    if vectors.shape[-1] != width:
        return None
    return vectors.float()


def _lookup_embedding(name_and_rest: str, resolve: EmbeddingResolver) -> tuple[Any, str, str]:
    """Resolve the first word after "embedding:"; returns (value or None, name tried, leftover text). Trailing
    commas of the name are tried without them, the commas then go back into the leftover text."""
    words = name_and_rest.split()
    if not words:
        return None, "", ""
    name, leftover = words[0], " ".join(words[1:])
    value = resolve(name)
    if value is None:
        stripped = name.rstrip(",")
        if len(stripped) < len(name):
            return resolve(stripped), stripped, f"{name[len(stripped):]} {leftover}"
    return value, name, leftover



def apply_token_weights(z: torch.Tensor, tokens: Sequence[WeightedToken], encode_empty: Callable[[], torch.Tensor],
                        token_axis: int = 1) -> torch.Tensor:
    """ComfyUI's token-weight rule for one encoded sequence: a token of weight w becomes (z - z_empty)·w + z_empty,
    z_empty the encoding of the empty prompt of the same length; tokens of weight 1 are untouched. `encode_empty`
    runs only when some weight is not 1; `token_axis` is the axis of z that runs over the tokens."""
    weights = torch.tensor([float(w) for _, w in tokens])
    if not bool((weights != 1.0).any()):
        return z
    z_empty = encode_empty()
    shape = [1] * z.dim()
    shape[token_axis] = len(tokens)
    w = weights.view(shape)
    return torch.where(w != 1.0, (z - z_empty) * w + z_empty, z)

def token_groups(text: str, encoder_key: str = "l", width: int | None = None,
                 resolve_embedding: EmbeddingResolver | None = None,
                 warn: Warn | None = None, encode: Callable[[str], list[int]] | None = None,
                 encoder_name: str | None = None) -> list[list[WeightedToken]]:
    """The weighted token groups of a prompt for one encoder (one group per segment piece, one per embedding).

    Without a resolver, `embedding:NAME` is ordinary text. With one, a name it cannot resolve is dropped with a
    warning (ComfyUI's behaviour when the file does not exist); an embedding whose width does not match this
    encoder is also dropped with a warning. `encode` turns text into ids (default: CLIP's BPE); `encoder_name`
    names the encoder in warnings (default: clip_<encoder_key>).
    """
    encode = bpe_ids if encode is None else encode
    encoder_name = f"clip_{encoder_key}" if encoder_name is None else encoder_name
    groups: list[list[WeightedToken]] = []
    for segment, weight in parse_prompt_weights(text):
        for piece in _split_embedding_words(segment):
            if resolve_embedding is not None and piece.startswith(EMBEDDING_PREFIX):
                value, name, leftover = _lookup_embedding(piece[len(EMBEDDING_PREFIX):].strip("\n"),
                                                          resolve_embedding)
                vectors = None if value is None or width is None else select_embedding_vectors(
                    value, encoder_key, width)
                if value is None:
                    _warn(warn, f"embedding:{name} does not exist, ignoring")
                elif vectors is None:
                    _warn(warn, f"embedding:{name} has no vectors of width {width} for {encoder_name}, ignoring")
                else:
                    groups.append([(vector, weight) for vector in vectors])
                if not leftover.strip():
                    continue
                piece = leftover
            ids = encode(piece)
            if ids:
                groups.append([(token_id, weight) for token_id in ids])
    return groups


def _warn(warn: Warn | None, message: str) -> None:
    if warn is not None:
        warn(message)
    else:
        log.warning(message)


# ---------------------------------------------------------------------------------------------------------------
# Chunking


def chunk_tokens(groups: list[list[WeightedToken]], fmt: ChunkFormat = SD1_CHUNKS) -> list[Chunk]:
    """Pack token groups into chunks of exactly `fmt.length` tokens, each framed by BOS ... EOS + padding."""
    capacity = fmt.length - 1  # the room for BOS + content; EOS takes the last slot
    chunks: list[Chunk] = []
    chunk: Chunk = [(fmt.bos_id, 1.0)]
    for group in groups:
        splittable = len(group) >= fmt.max_word_length
        remaining_group = list(group)
        while remaining_group:
            room = capacity - len(chunk)
            if len(remaining_group) <= room:
                chunk.extend(remaining_group)
                break
            if splittable:
                chunk.extend(remaining_group[:room])
                remaining_group = remaining_group[room:]
            chunks.append(_close_chunk(chunk, fmt))
            chunk = [(fmt.bos_id, 1.0)]
    chunks.append(_close_chunk(chunk, fmt))
    return chunks


def _close_chunk(chunk: Chunk, fmt: ChunkFormat) -> Chunk:
    closed = chunk + [(fmt.eos_id, 1.0)]
    return closed + [(fmt.pad_id, 1.0)] * (fmt.length - len(closed))


def empty_chunk(fmt: ChunkFormat = SD1_CHUNKS) -> Chunk:
    """The chunk of the empty prompt: [BOS, EOS, pad...]."""
    return _close_chunk([(fmt.bos_id, 1.0)], fmt)


def tokenize_prompt(text: str, fmt: ChunkFormat = SD1_CHUNKS, encoder_key: str = "l", width: int | None = None,
                    resolve_embedding: EmbeddingResolver | None = None, warn: Warn | None = None) -> list[Chunk]:
    """A prompt as a list of 77-token weighted chunks for one encoder."""
    return chunk_tokens(token_groups(text, encoder_key, width, resolve_embedding, warn), fmt)


def chunk_ids(chunk: Chunk) -> list[int | None]:
    """The vocabulary ids of a chunk (None where an embedding vector sits)."""
    return [token if isinstance(token, int) else None for token, _ in chunk]
