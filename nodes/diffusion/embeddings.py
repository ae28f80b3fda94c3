"""Textual-inversion embeddings from models/embeddings, resolved for `embedding:NAME` in prompts.

`EmbeddingLibrary(env)` is the resolver ClipModel.tokenize expects (nodes.diffusion.tokenizer.EmbeddingResolver):
called with the name written in the prompt (with or without extension, optionally in a subfolder), it returns the
vectors [n, D], a mapping {"clip_l": [n, 768], "clip_g": [n, 1280]} for SDXL files, or None when no such file
exists or it holds no usable vectors. nodes.create_engine registers one as a service (ctx.service(EmbeddingLibrary)).

File forms: `.safetensors`; `.pt` / `.bin` only through torch.load(weights_only=True) (a pickle that needs more
than tensors and plain containers is refused, never executed). Contents: A1111's {"string_to_param": {"*": t}},
{"emb_params": t}, SDXL {"clip_l": t, "clip_g": t}, diffusers' {"<token>": t}, or a list of tensors.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

EXTENSIONS = (".safetensors", ".pt", ".bin")
ENCODER_KEYS = ("clip_l", "clip_g", "clip_h")
# Loaded embeddings kept per library (they are a few KB each); the oldest are forgotten beyond this.
MAX_CACHED = 256


def read_embedding_file(path: Path) -> Any:
    """The raw contents of an embedding file (tensors / dicts / lists of tensors)."""
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    return torch.load(path, map_location="cpu", weights_only=True)


def embedding_vectors(contents: Any) -> torch.Tensor | dict[str, torch.Tensor] | None:
    """The vectors of an embedding file's contents, in the forms the tokenizer accepts."""
    if isinstance(contents, torch.Tensor):
        return contents.float()
    if isinstance(contents, (list, tuple)):
        tensors = [t.reshape(-1, t.shape[-1]) for t in contents if isinstance(t, torch.Tensor)]
        return torch.cat(tensors).float() if tensors else None
    if not isinstance(contents, Mapping):
        return None
    if isinstance(contents.get("string_to_param"), Mapping):
        return embedding_vectors(next(iter(contents["string_to_param"].values()), None))
    if isinstance(contents.get("emb_params"), torch.Tensor):
        return contents["emb_params"].float()
    per_encoder = {key: value.float() for key, value in contents.items()
                   if key in ENCODER_KEYS and isinstance(value, torch.Tensor)}
    if per_encoder:
        return per_encoder
    tensors = [value for value in contents.values() if isinstance(value, torch.Tensor)]
    return tensors[0].float() if len(tensors) == 1 else None


class EmbeddingLibrary:
    """Resolver of embedding names against the environment's embeddings folders, with a small cache."""

    def __init__(self, env: Any):
        self.env = env
        self._cache: OrderedDict[tuple, Any] = OrderedDict()
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        """Embedding names as prompts spell them (no extension), for the /embeddings catalogue."""
        return sorted({name.rsplit(".", 1)[0] if name.lower().endswith(EXTENSIONS) else name
                       for name in self.env.list_models("embeddings")})

    def find(self, name: str) -> Path | None:
        """The file for a name as written in a prompt: exact first, then with each known extension."""
        name = name.strip()
        if not name:
            return None
        for candidate in (name, *(name + ext for ext in EXTENSIONS)):
            try:
                path = self.env.find_model("embeddings", candidate)
            except FileNotFoundError:
                continue
            if path.is_file():
                return path
        return None

    def __call__(self, name: str) -> torch.Tensor | dict[str, torch.Tensor] | None:
        path = self.find(name)
        if path is None:
            return None
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        try:
            vectors = embedding_vectors(read_embedding_file(path))
        except Exception as error:  # unreadable or unsafe file: ComfyUI skips the embedding with a warning
            log.warning("embedding %s (%s) could not be loaded: %s", name, path.name, error)
            return None
        if vectors is None:
            log.warning("embedding %s (%s) holds no embedding vectors", name, path.name)
            return None
        with self._lock:
            self._cache[key] = vectors
            while len(self._cache) > MAX_CACHED:
                self._cache.popitem(last=False)
        return vectors
