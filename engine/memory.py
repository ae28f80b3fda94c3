"""The model memory manager: one shared home for loaded networks, their devices and their memory budgets.

Generic on purpose (no diffusion knowledge): it sees `torch.nn.Module`s and opaque loaded values.

* Loaded values are registered once under an identity key (`get_or_load(key, loader_fn)`), so two loader nodes
  on the same file get the very same objects.
* Every `nn.Module` found in a loaded value is tracked with its byte size. A module lives either on the compute
  device (while used, and afterwards until room is needed) or on the offload device (CPU RAM).
* `use(module)` puts a module on the compute device for the duration of a `with` block. Making room follows
  least-recently-used order: idle modules are moved VRAM → RAM when the VRAM budget is exceeded, and whole
  entries are dropped from the registry when the RAM budget is exceeded (the next `get_or_load` loads again).
  Modules in use are never moved.
* Streaming (on by default): a module larger than the room the budget leaves, once the idle modules are offloaded,
  is placed partly. Its layers go to the compute device in module order while they fit (greedily: a layer that
  does not fit is skipped, a smaller one after it may still fit); only placed bytes count against the budget. The
  Linear / Conv layers left in RAM fetch their weight and bias to the input's device for each call
  (engine.layer_streaming); other tensors (norms, embeddings, buffers: small) are always placed. A partly placed
  module keeps its split until it is offloaded. Without streaming, such a module is placed whole, over budget.
* `use(module, changes)` also makes a module's reversible in-place changes (weight patches: objects with
  `apply(module) -> undo`) the given sequence. The applied set stays on the module after the block, and is
  undone (exactly, in reverse order) and replaced only when a later `use` asks for a different sequence (compared
  by equality, element by element), so repeating a patched computation costs no patching at all. A module is
  always returned to its pristine weights before it stops being tracked. Users asking for different changes of
  one module take turns (a second thread waits until the module is idle).
* `stats()` reports bytes per device, the loaded entries and eviction counts for the run summary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import threading
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .layer_streaming import enable_fetching, move_own_tensors, placement_units

log = logging.getLogger(__name__)

# Roles a loader can ask a dtype for; the policy maps each role to a dtype per device type.
ROLES = ("diffusion", "text_encoder", "vae", "other")
# Names accepted wherever a dtype is configured (command-line flags, settings files).
DTYPE_NAMES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
               "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def parse_dtype(value: torch.dtype | str) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    try:
        return DTYPE_NAMES[value.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {value!r}; use one of {', '.join(DTYPE_NAMES)}") from None


_BYTE_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
               "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value: int | str) -> int:
    """A byte count from an int or text such as "6GB", "1.5 GiB", "800MB" or "6000000000" (KB/MB/GB/TB are powers
    of 1000, KiB/MiB/GiB/TiB powers of 1024)."""
    if isinstance(value, int):
        return value
    text = value.strip().lower()
    number = text.rstrip("abcdefghijklmnopqrstuvwxyz").strip()
    unit = text[len(number):].strip()
    try:
        amount = float(number) * _BYTE_UNITS[unit]
    except (KeyError, ValueError):
        raise ValueError(f"not a byte size: {value!r} (examples: 6GB, 1.5GiB, 800MB, 6000000000)") from None
    if amount < 0:
        raise ValueError(f"a byte size cannot be negative: {value!r}")
    return int(amount)


def default_device() -> torch.device:
    """CUDA when present, else Apple MPS where available, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def default_dtypes(device: torch.device) -> dict[str, torch.dtype]:
    """Storage dtypes per role, as ComfyUI picks them without flags: half precision on accelerators, fp32 on CPU
    (fp16 maths is several times slower than fp32 on CPU). The VAE prefers bf16 where the GPU supports it
    (compute capability >= 8) since fp16 VAEs overflow; otherwise fp32."""
    if device.type == "cuda":
        vae = torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float32
        return {"diffusion": torch.float16, "text_encoder": torch.float16, "vae": vae, "other": torch.float16}
    if device.type == "mps":
        return {"diffusion": torch.float16, "text_encoder": torch.float16, "vae": torch.float32,
                "other": torch.float16}
    return {role: torch.float32 for role in ROLES}


def module_nbytes(module: torch.nn.Module) -> int:
    """Bytes held by a module's parameters and buffers (each storage counted once)."""
    seen: set[int] = set()
    total = 0
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        if tensor.device.type == "meta":
            continue
        storage = tensor.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


def module_device(module: torch.nn.Module) -> torch.device:
    tensor = next(itertools.chain(module.parameters(), module.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def find_modules(value: Any, max_depth: int = 4) -> list[torch.nn.Module]:
    """The top-level nn.Modules inside a loaded value: the value itself, or modules reachable through tuples,
    lists, dict values, dataclass fields and plain attributes, a few levels deep (not inside modules)."""
    found: dict[int, torch.nn.Module] = {}
    seen: set[int] = set()
    frontier: list[tuple[Any, int]] = [(value, 0)]
    while frontier:
        item, depth = frontier.pop()
        if id(item) in seen or item is None or isinstance(item, (str, bytes, int, float, bool, torch.Tensor)):
            continue
        seen.add(id(item))
        if isinstance(item, torch.nn.Module):
            found.setdefault(id(item), item)
            continue
        if depth >= max_depth:
            continue
        if isinstance(item, (tuple, list, set, frozenset)):
            children = list(item)
        elif isinstance(item, dict):
            children = list(item.values())
        elif dataclasses.is_dataclass(item) and not isinstance(item, type):
            children = [getattr(item, f.name) for f in dataclasses.fields(item)]
        elif hasattr(item, "__dict__") and not isinstance(item, type):
            children = list(vars(item).values())
        else:
            children = []
        frontier.extend((child, depth + 1) for child in children)
    return list(found.values())


@dataclass
class _ModuleRecord:
    module: torch.nn.Module
    nbytes: int
    keys: set[Hashable] = field(default_factory=set)
    last_used: int = 0
    in_use: int = 0
    on_compute: bool = False
    placed_bytes: int = 0                                     # of nbytes, those on the compute device
    changes: tuple[Any, ...] = ()                             # applied in-place changes, in order
    undo: list[Callable[[], None]] = field(default_factory=list)
    users: dict[int, int] = field(default_factory=dict)      # thread id -> nested uses


@dataclass
class _Entry:
    value: Any
    module_ids: list[int]
    last_used: int = 0


@dataclass
class MemoryStats:
    compute_device: str
    offload_device: str
    bytes_by_device: dict[str, int]
    vram_budget: int | None
    ram_budget: int | None
    stream_weights: bool
    streamed_bytes: int  # bytes of modules in place on the compute device whose layers stay in RAM, streamed
    entries: list[dict[str, Any]]
    loads: int
    hits: int
    offloads: int
    drops: int

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class ModelManager:
    """Registry + placement of loaded models. Thread-safe; one per engine (Environment.models).

    vram_budget: bytes of modules allowed on the compute device (None: 90% of the GPU's memory on CUDA,
    unlimited elsewhere). ram_budget: bytes of modules allowed on the offload device (None: unlimited).
    When the compute device is the CPU, compute and offload are the same memory and only ram_budget applies.
    stream_weights: place a module that exceeds the room left partly and stream the rest per layer (else: whole).
    """

    def __init__(self, device: torch.device | str | None = None,
                 dtypes: dict[str, torch.dtype | str] | None = None,
                 vram_budget: int | None = None, ram_budget: int | None = None,
                 offload_device: torch.device | str = "cpu", stream_weights: bool = True):
        self.device = torch.device(device) if device is not None else default_device()
        self.offload_device = torch.device(offload_device)
        parsed = {role: parse_dtype(value) for role, value in (dtypes or {}).items()}
        if not set(ROLES) <= set(parsed):
            parsed = {**default_dtypes(self.device), **parsed}
        self.dtypes: dict[str, torch.dtype] = parsed
        if vram_budget is None and self.device.type == "cuda":
            vram_budget = int(torch.cuda.get_device_properties(self.device).total_memory * 0.9)
        self.vram_budget = vram_budget
        self.ram_budget = ram_budget
        self.stream_weights = stream_weights
        self._lock = threading.RLock()
        self._idle = threading.Condition(self._lock)   # notified when a module stops being in use
        self._entries: dict[Hashable, _Entry] = {}
        # How often each key was dropped: loader nodes put it in their cache fingerprint, so outputs that still
        # reference dropped weights are recomputed instead of served from the output cache.
        self._times_dropped: dict[Hashable, int] = {}
        self._modules: dict[int, _ModuleRecord] = {}
        self._clock = itertools.count(1)
        self._loads = self._hits = self._offloads = self._drops = 0

    # Policies ----------------------------------------------------------------------------------------------

    @property
    def shared_memory(self) -> bool:
        """True when the compute device is the offload device (CPU-only): nothing to move."""
        return self.device.type == self.offload_device.type

    def dtype_for(self, role: str) -> torch.dtype:
        if role not in self.dtypes:
            raise ValueError(f"unknown dtype role {role!r}; known: {', '.join(sorted(self.dtypes))}")
        return self.dtypes[role]

    # Registry ----------------------------------------------------------------------------------------------

    def get_or_load(self, key: Hashable, loader_fn: Callable[[], Any]) -> Any:
        """The value registered under `key`, loading it with `loader_fn()` the first time. Modules inside the
        value are tracked (and start on the offload device, moved to compute only by `use`)."""
        # Loads are serialised: two threads loading one file at once would defeat the sharing, and loads are rare.
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._hits += 1
                entry.last_used = next(self._clock)
                return entry.value
            value = loader_fn()
            self._loads += 1
            module_ids = []
            for module in find_modules(value):
                record = self._track(module)
                record.keys.add(key)
                module_ids.append(id(module))
            self._entries[key] = _Entry(value, module_ids, next(self._clock))
            self._enforce_ram_budget(protect=key)
            return value

    def register(self, module: torch.nn.Module) -> None:
        """Track a module that did not come through get_or_load (e.g. one built by a node)."""
        with self._lock:
            self._track(module)

    def _track(self, module: torch.nn.Module) -> _ModuleRecord:
        record = self._modules.get(id(module))
        if record is None or record.module is not module:
            on_compute = not self.shared_memory and module_device(module).type == self.device.type
            nbytes = module_nbytes(module)
            record = _ModuleRecord(module, nbytes, last_used=next(self._clock), on_compute=on_compute,
                                   placed_bytes=nbytes if on_compute else 0)
            self._modules[id(module)] = record
        return record

    def loaded_keys(self) -> list[Hashable]:
        with self._lock:
            return list(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._entries

    # Placement ---------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def use(self, module: torch.nn.Module, changes: Sequence[Any] = ()) -> Iterator[torch.nn.Module]:
        """The module on the compute device, with exactly `changes` applied, for the duration of the block. It
        stays there afterwards (changes included) until another module needs the room or another use asks for
        other changes (moving or re-patching weights for every call would dominate run time)."""
        wanted = tuple(changes)
        thread = threading.get_ident()
        with self._lock:
            record = self._track(module)
            while record.in_use and record.changes != wanted:
                if thread in record.users:
                    raise RuntimeError("a module already in use by this thread was asked for with other "
                                       "weight patches")
                self._idle.wait()
                record = self._track(module)
            record.in_use += 1
            record.users[thread] = record.users.get(thread, 0) + 1
            record.last_used = next(self._clock)
            try:
                if not self.shared_memory and not record.on_compute:
                    self._place(record)
                if record.changes != wanted:
                    self._apply_changes(record, wanted)
            except BaseException:
                self._release(record, thread)
                raise
        try:
            yield module
        finally:
            with self._lock:
                self._release(record, thread)

    def _release(self, record: _ModuleRecord, thread: int) -> None:
        record.in_use -= 1
        record.users[thread] -= 1
        if not record.users[thread]:
            del record.users[thread]
        record.last_used = next(self._clock)
        if not record.in_use:
            self._idle.notify_all()

    def _apply_changes(self, record: _ModuleRecord, wanted: tuple[Any, ...]) -> None:
        """Undo the applied changes (reverse order), then apply `wanted` in order; on failure the module is left
        pristine."""
        self._undo_changes(record)
        try:
            for change in wanted:
                record.undo.append(change.apply(record.module))
        except BaseException:
            self._undo_changes(record)
            raise
        record.changes = wanted

    def _undo_changes(self, record: _ModuleRecord) -> None:
        while record.undo:
            record.undo.pop()()
        record.changes = ()

    def restore(self, module: torch.nn.Module) -> None:
        """Return an idle module to its pristine weights now (for code that reads them directly)."""
        with self._lock:
            record = self._modules.get(id(module))
            if record is None or record.module is not module:
                return
            while record.in_use and record.changes:
                self._idle.wait()
            self._undo_changes(record)

    def applied_changes(self, module: torch.nn.Module) -> tuple[Any, ...]:
        """The changes the module carries now (empty when pristine or untracked)."""
        with self._lock:
            record = self._modules.get(id(module))
            return record.changes if record is not None and record.module is module else ()

    def offload(self, module: torch.nn.Module) -> None:
        """Move a module to the offload device now (no-op when it is in use or already there)."""
        with self._lock:
            record = self._modules.get(id(module))
            if record is not None and record.in_use == 0:
                self._move_to_offload(record)

    def _transfer(self, module: torch.nn.Module, device: torch.device) -> None:
        """Where whole modules move between devices (tests substitute it to simulate an accelerator)."""
        module.to(device)

    def _transfer_layer(self, layer: torch.nn.Module, device: torch.device) -> None:
        """Where one layer's own tensors move when a module is placed partly (substituted like _transfer)."""
        move_own_tensors(layer, device)

    def _place(self, record: _ModuleRecord) -> None:
        """Put an offloaded module on the compute device: whole when it fits (after offloading idle modules),
        else partly when streaming and some of its layers can stream, else whole over budget."""
        room = self._make_room_on_compute(record.nbytes)
        if room is not None and record.nbytes > room and self.stream_weights:
            placed, streamed = self._plan_partial_placement(record.module, room)
            if streamed:
                self._place_partly(record, room, placed, streamed)
                record.on_compute = True
                return
        if room is not None and record.nbytes > room:
            log.warning("model of %d bytes exceeds the VRAM budget (%d bytes left of %d); loading it whole",
                        record.nbytes, room, self.vram_budget)
        self._transfer(record.module, self.device)
        record.placed_bytes = record.nbytes
        record.on_compute = True

    @staticmethod
    def _plan_partial_placement(module: torch.nn.Module, room: int) \
            -> tuple[list[tuple[torch.nn.Module, int]], list[torch.nn.Module]]:
        """The layers to place, with their bytes (those that cannot stream, then the streamable ones in module
        order while they fit), and the layers to stream."""
        units = placement_units(module)
        left = room - sum(nbytes for _, nbytes, can_stream in units if not can_stream)
        placed, streamed = [], []
        for layer, nbytes, can_stream in units:
            if can_stream and nbytes > left:
                streamed.append(layer)
                continue
            if can_stream:
                left -= nbytes
            placed.append((layer, nbytes))
        return placed, streamed

    def _place_partly(self, record: _ModuleRecord, room: int, placed: list[tuple[torch.nn.Module, int]],
                      streamed: list[torch.nn.Module]) -> None:
        enable_fetching(streamed)
        for layer, _ in placed:
            self._transfer_layer(layer, self.device)
        record.placed_bytes = sum(nbytes for _, nbytes in placed)
        if record.placed_bytes > room:
            log.warning("the layers of a model that cannot stream take %d bytes, over the %d left in the VRAM "
                        "budget; placing them anyway", record.placed_bytes, room)
        log.info("model of %d bytes placed partly: %d bytes on %s, %d streamed from %s per call", record.nbytes,
                 record.placed_bytes, self.device, record.nbytes - record.placed_bytes, self.offload_device)

    def _on_compute(self, record: _ModuleRecord) -> bool:
        return record.on_compute

    def _bytes_on_compute(self) -> int:
        return sum(r.placed_bytes for r in self._modules.values() if self._on_compute(r))

    def _bytes_on_offload(self) -> int:
        return sum(r.nbytes - (r.placed_bytes if self._on_compute(r) else 0) for r in self._modules.values())

    def _move_to_offload(self, record: _ModuleRecord) -> None:
        if record.on_compute:
            self._transfer(record.module, self.offload_device)
            record.on_compute = False
            record.placed_bytes = 0
            self._offloads += 1

    def _make_room_on_compute(self, needed: int) -> int | None:
        """Offload idle modules from the compute device, least recently used first, until `needed` fits; the
        bytes left in the budget afterwards (None without a budget)."""
        if self.vram_budget is None:
            return None
        idle = sorted((r for r in self._modules.values() if self._on_compute(r) and r.in_use == 0),
                      key=lambda r: r.last_used)
        used = self._bytes_on_compute()
        for record in idle:
            if used + needed <= self.vram_budget:
                break
            used -= record.placed_bytes
            self._move_to_offload(record)
        # What was offloaded now occupies RAM.
        self._enforce_ram_budget()
        return self.vram_budget - used

    def _enforce_ram_budget(self, protect: Hashable | None = None) -> None:
        """Drop whole entries, least recently used first, while RAM use exceeds the budget. Entries with a
        module in use, and `protect` (the one just loaded), are kept."""
        if self.ram_budget is None:
            return
        candidates = sorted((item for item in self._entries.items() if item[0] != protect),
                            key=lambda item: item[1].last_used)
        for key, entry in candidates:
            if self._bytes_on_offload() <= self.ram_budget:
                return
            if any(self._modules[m].in_use for m in entry.module_ids if m in self._modules):
                continue
            self._drop(key)
        if self._bytes_on_offload() > self.ram_budget:
            log.warning("models in use exceed the RAM budget (%d > %d bytes)", self._bytes_on_offload(),
                        self.ram_budget)

    def _drop(self, key: Hashable) -> None:
        entry = self._entries.pop(key)
        self._drops += 1
        self._times_dropped[key] = self._times_dropped.get(key, 0) + 1
        for module_id in entry.module_ids:
            record = self._modules.get(module_id)
            if record is None:
                continue
            record.keys.discard(key)
            if not record.keys and record.in_use == 0:
                # Leave nothing on the accelerator (and no patch) for whoever still holds a reference.
                self._undo_changes(record)
                self._move_to_offload(record)
                del self._modules[module_id]

    def times_dropped(self, key: Hashable) -> int:
        """How many times the entry under `key` was dropped (by budget, drop() or free_all())."""
        with self._lock:
            return self._times_dropped.get(key, 0)

    def drop(self, key: Hashable) -> bool:
        """Forget one entry (the next get_or_load with its key loads again). False when it is not loaded."""
        with self._lock:
            if key not in self._entries:
                return False
            self._drop(key)
            return True

    def free_all(self) -> None:
        """Forget every entry and idle module (modules in use stay tracked), and release cached device memory."""
        with self._lock:
            for key in list(self._entries):
                self._drop(key)
            for module_id, record in list(self._modules.items()):
                if record.in_use == 0:
                    self._undo_changes(record)
                    self._move_to_offload(record)
                    del self._modules[module_id]
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # Reporting ---------------------------------------------------------------------------------------------

    def _device_name(self, record: _ModuleRecord) -> str:
        return str(self.device if record.on_compute or self.shared_memory else self.offload_device)

    def _streamed_bytes(self, record: _ModuleRecord) -> int:
        return record.nbytes - record.placed_bytes if record.on_compute and not self.shared_memory else 0

    def stats(self) -> MemoryStats:
        with self._lock:
            by_device: dict[str, int] = {}
            for record in self._modules.values():
                name = self._device_name(record)
                streamed = self._streamed_bytes(record)
                by_device[name] = by_device.get(name, 0) + record.nbytes - streamed
                if streamed:
                    offload = str(self.offload_device)
                    by_device[offload] = by_device.get(offload, 0) + streamed
            entries = []
            for key, entry in self._entries.items():
                records = [self._modules[m] for m in entry.module_ids if m in self._modules]
                entries.append({
                    "key": str(key),
                    "bytes": sum(r.nbytes for r in records),
                    "devices": sorted({self._device_name(r) for r in records}),
                    "last_used": entry.last_used,
                })
            return MemoryStats(
                compute_device=str(self.device), offload_device=str(self.offload_device),
                bytes_by_device=by_device, vram_budget=self.vram_budget, ram_budget=self.ram_budget,
                stream_weights=self.stream_weights,
                streamed_bytes=sum(self._streamed_bytes(r) for r in self._modules.values()),
                entries=entries, loads=self._loads, hits=self._hits, offloads=self._offloads, drops=self._drops,
            )
