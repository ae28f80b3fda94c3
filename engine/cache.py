"""Content-addressed output cache.

A node's key is a hash of its own signature (type, version, fingerprint, constants) and the keys of the nodes
feeding it (with their slots): Merkle-style, computed once per node in topological order, so the cost is linear in
the graph and node ids never enter the key (a renumbered graph still hits). Entries are bounded by bytes (tensor
sizes counted) and evicted least-recently-used. They also age out: when a prompt begins, an entry that neither it
nor any of the last `keep_prompts` prompts needed is dropped, so a server fed distinct prompts holds the recent prompts'
outputs (and the models every prompt reuses), not every prompt's up to the byte budget. ComfyUI keeps the last
prompt's outputs; a few more make switching between variants of a graph cheap.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

DEFAULT_CACHE_BYTES = 2 * 1024**3
DEFAULT_KEEP_PROMPTS = 8


class Uncacheable(Exception):
    """Raised while hashing a constant that has no stable content representation."""


def _stable(value: Any) -> Any:
    """A JSON-serialisable, order-stable form of a constant or fingerprint."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if math.isnan(value):
            raise Uncacheable("NaN")
        return repr(value)
    if isinstance(value, (list, tuple)):
        return [_stable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _stable(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, bytes):
        return hashlib.sha256(value).hexdigest()
    raise Uncacheable(type(value).__name__)


def node_key(class_type: str, version: str, constants: dict[str, Any], fingerprint: Any,
             linked: list[tuple[str, str, int]], salt: str | None = None) -> str:
    """The cache key of one node. `linked` = (input name, source key, slot); `salt` makes the key unique (used for
    non-deterministic nodes and for values that cannot be hashed, so they never hit)."""
    payload = [class_type, version, _stable(fingerprint), _stable(constants), sorted(linked), salt]
    return hashlib.blake2b(json.dumps(payload, separators=(",", ":")).encode(), digest_size=20).hexdigest()


def estimate_nbytes(value: Any) -> int:
    """Bytes held by a cached value: tensors and arrays by their buffers, containers by their contents. Objects
    may report their own size with cache_nbytes() (models do: their weights belong to the memory manager)."""
    total = 0
    stack = [value]
    seen: set[int] = set()
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        reporter = getattr(item, "cache_nbytes", None)
        if callable(reporter):
            total += int(reporter())
        elif hasattr(item, "element_size") and hasattr(item, "nelement"):  # torch tensor
            total += item.element_size() * item.nelement()
        elif hasattr(item, "nbytes") and isinstance(item.nbytes, int):  # numpy array
            total += item.nbytes
        elif isinstance(item, dict):
            stack.extend(item.values())
            total += sys.getsizeof(item)
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack.extend(item)
            total += sys.getsizeof(item)
        else:
            total += sys.getsizeof(item)
    return total


@dataclass
class CacheEntry:
    outputs: list[list[Any]]  # per output slot, the list of values (list mapping)
    ui: dict[str, Any] | None
    nbytes: int
    last_prompt: int = 0  # the number of the last prompt that needed it


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes: int = 0
    entries: int = 0
    budget: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class OutputCache:
    """LRU by bytes, with entries aged out after `keep_prompts` prompts that did not need them (None: never). An
    entry bigger than the whole budget is not stored (it would evict everything)."""

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES, keep_prompts: int | None = DEFAULT_KEEP_PROMPTS):
        if keep_prompts is not None and keep_prompts < 1:
            raise ValueError(f"keep_prompts must be at least 1, got {keep_prompts}")
        self.max_bytes = max_bytes
        self.keep_prompts = keep_prompts
        self._entries: OrderedDict[str, CacheEntry] = OrderedDict()
        self._bytes = 0
        self._prompt = 0
        self._lock = threading.Lock()
        self._stats = CacheStats(budget=max_bytes)

    def get(self, key: str) -> CacheEntry | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self._stats.misses += 1
                return None
            self._entries.move_to_end(key)
            entry.last_prompt = self._prompt
            self._stats.hits += 1
            return entry

    def begin_prompt(self, needed_keys: list[str]) -> list[str]:
        """Start the next prompt: the entries among `needed_keys` count as used by it, and entries that no prompt
        of the last `keep_prompts` needed are evicted. Returns the needed keys that are cached."""
        with self._lock:
            self._prompt += 1
            cached = []
            for key in needed_keys:
                entry = self._entries.get(key)
                if entry is not None:
                    entry.last_prompt = self._prompt
                    cached.append(key)
            if self.keep_prompts is not None:
                oldest_kept = self._prompt - self.keep_prompts  # the current prompt and the last `keep` before it
                for key in [k for k, e in self._entries.items() if e.last_prompt < oldest_kept]:
                    self._bytes -= self._entries.pop(key).nbytes
                    self._stats.evictions += 1
            return cached

    def put(self, key: str, outputs: list[list[Any]], ui: dict[str, Any] | None) -> bool:
        nbytes = estimate_nbytes(outputs)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            if nbytes > self.max_bytes:
                return False
            self._entries[key] = CacheEntry(outputs, ui, nbytes, self._prompt)
            self._bytes += nbytes
            while self._bytes > self.max_bytes and self._entries:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.nbytes
                self._stats.evictions += 1
            return key in self._entries

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(self._stats.hits, self._stats.misses, self._stats.evictions, self._bytes,
                              len(self._entries), self.max_bytes)
