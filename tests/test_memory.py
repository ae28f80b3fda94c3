"""The model memory manager on small nn.Modules: sharing, budgets and LRU eviction, use(), free_all, stats."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from latentloom.engine.memory import ModelManager, find_modules, module_nbytes

FP32 = {"diffusion": torch.float32, "text_encoder": torch.float32, "vae": torch.float32, "other": torch.float32}


def linear(n: int) -> torch.nn.Linear:
    """A module of exactly n*n*4 + n*4 bytes."""
    return torch.nn.Linear(n, n)


class SimulatedAccelerator(ModelManager):
    """A manager whose compute device is a pretend accelerator: transfers are recorded instead of performed, so
    the VRAM bookkeeping can be tested on a CPU-only machine."""

    def __init__(self, **kwargs):
        super().__init__(device="cuda", offload_device="cpu", dtypes=FP32, **kwargs)
        self.transfers: list[tuple[int, str]] = []

    def _transfer(self, module, device):
        self.transfers.append((id(module), device.type))


@dataclass(frozen=True)
class Bundle:
    unet: torch.nn.Module
    extra: tuple


def test_module_nbytes_counts_parameters_and_shared_storage_once():
    layer = linear(8)
    assert module_nbytes(layer) == (8 * 8 + 8) * 4
    tied = torch.nn.Sequential(layer, layer)
    assert module_nbytes(tied) == module_nbytes(layer)
    layer.register_buffer("stat", torch.zeros(10, dtype=torch.float64))
    assert module_nbytes(layer) == (8 * 8 + 8) * 4 + 80


def test_find_modules_walks_containers_and_dataclasses_but_not_into_modules():
    a, b, c = linear(2), linear(3), torch.nn.Sequential(linear(4))
    found = find_modules(Bundle(unet=a, extra=({"x": b}, [c, "text", 3])))
    assert {id(m) for m in found} == {id(a), id(b), id(c)}


def test_get_or_load_shares_one_value_per_key():
    manager = ModelManager(device="cpu")
    calls = []

    def load():
        calls.append(1)
        return Bundle(linear(4), ())

    first = manager.get_or_load(("file.safetensors", 10, 1.0), load)
    second = manager.get_or_load(("file.safetensors", 10, 1.0), load)
    other = manager.get_or_load(("other.safetensors", 10, 1.0), load)
    assert first is second and first.unet is second.unet
    assert other is not first
    assert len(calls) == 2
    stats = manager.stats()
    assert (stats.loads, stats.hits) == (2, 1)
    assert len(stats.entries) == 2


def test_failed_load_registers_nothing():
    manager = ModelManager(device="cpu")

    def broken():
        raise ValueError("bad file")

    with pytest.raises(ValueError, match="bad file"):
        manager.get_or_load("k", broken)
    assert "k" not in manager
    assert manager.get_or_load("k", lambda: linear(2)) is not None


def test_default_policy_on_cpu_is_fp32_and_overridable():
    manager = ModelManager(device="cpu")
    assert manager.device.type == "cpu"
    assert manager.dtype_for("diffusion") == torch.float32
    assert manager.dtype_for("vae") == torch.float32
    custom = ModelManager(device="cpu", dtypes={"diffusion": torch.bfloat16, "vae": "fp16"})
    assert custom.dtype_for("diffusion") == torch.bfloat16
    assert custom.dtype_for("vae") == torch.float16
    assert custom.dtype_for("text_encoder") == torch.float32
    with pytest.raises(ValueError, match="unknown dtype role"):
        manager.dtype_for("nonsense")
    with pytest.raises(ValueError, match="unknown dtype 'fp7'"):
        ModelManager(device="cpu", dtypes={"vae": "fp7"})


def test_ram_budget_drops_least_recently_used_entries():
    size = module_nbytes(linear(16))
    manager = ModelManager(device="cpu", ram_budget=2 * size)
    first = manager.get_or_load("a", lambda: linear(16))
    manager.get_or_load("b", lambda: linear(16))
    manager.get_or_load("a", lambda: linear(16))  # touch a: b is now the least recently used
    manager.get_or_load("c", lambda: linear(16))
    assert set(manager.loaded_keys()) == {"a", "c"}
    assert manager.stats().drops == 1
    # a survived the eviction and is still the same object; b loads afresh.
    assert manager.get_or_load("a", lambda: linear(16)) is first
    assert manager.get_or_load("b", lambda: linear(16)) is not None
    assert sum(manager.stats().bytes_by_device.values()) <= 2 * size


def test_entry_in_use_is_never_dropped():
    size = module_nbytes(linear(16))
    manager = ModelManager(device="cpu", ram_budget=size)
    busy = manager.get_or_load("busy", lambda: linear(16))
    with manager.use(busy):
        manager.get_or_load("new", lambda: linear(16))
        assert "busy" in manager and "new" in manager
    # Once idle, the next load may evict it.
    manager.get_or_load("newer", lambda: linear(16))
    assert "busy" not in manager


def test_vram_budget_offloads_least_recently_used_to_ram():
    size = module_nbytes(linear(16))
    manager = SimulatedAccelerator(vram_budget=2 * size)
    a, b, c = (manager.get_or_load(name, lambda: linear(16)) for name in "abc")
    assert manager.transfers == []  # loading leaves weights in RAM
    with manager.use(a):
        pass
    with manager.use(b):
        pass
    with manager.use(a):  # already there: no transfer, but a becomes the most recent
        pass
    assert manager.transfers == [(id(a), "cuda"), (id(b), "cuda")]
    with manager.use(c):
        pass
    # b was least recently used, so it went back to RAM to make room for c.
    assert manager.transfers[2:] == [(id(b), "cpu"), (id(c), "cuda")]
    stats = manager.stats()
    assert stats.offloads == 1
    assert stats.bytes_by_device == {"cuda": 2 * size, "cpu": size}
    # Nothing is dropped: all three stay registered.
    assert set(manager.loaded_keys()) == {"a", "b", "c"}


def test_modules_in_use_are_not_offloaded_even_over_budget():
    size = module_nbytes(linear(16))
    manager = SimulatedAccelerator(vram_budget=size)
    a = manager.get_or_load("a", lambda: linear(16))
    b = manager.get_or_load("b", lambda: linear(16))
    with manager.use(a), manager.use(b):
        moves = list(manager.transfers)
    assert moves == [(id(a), "cuda"), (id(b), "cuda")]
    assert manager.stats().bytes_by_device == {"cuda": 2 * size}


def test_vram_offload_then_ram_budget_drops():
    size = module_nbytes(linear(16))
    manager = SimulatedAccelerator(vram_budget=size, ram_budget=size)
    a = manager.get_or_load("a", lambda: linear(16))
    with manager.use(a):
        pass
    b = manager.get_or_load("b", lambda: linear(16))  # RAM: b only (a is on the accelerator)
    with manager.use(b):  # a goes VRAM -> RAM, which overflows RAM: a (least recent) is dropped
        pass
    assert manager.loaded_keys() == ["b"]
    stats = manager.stats()
    assert (stats.offloads, stats.drops) == (1, 1)


def test_use_moves_real_modules_and_leaves_them_until_room_is_needed():
    manager = ModelManager(device="cpu")
    layer = manager.get_or_load("x", lambda: linear(4))
    with manager.use(layer) as module:
        assert module is layer
        assert module(torch.ones(1, 4)).shape == (1, 4)
    assert manager.stats().offloads == 0


def test_use_of_an_unregistered_module_tracks_it():
    manager = SimulatedAccelerator(vram_budget=10**6)
    stray = linear(4)
    with manager.use(stray):
        pass
    assert manager.stats().bytes_by_device == {"cuda": module_nbytes(stray)}


def test_free_all_forgets_everything_and_offloads():
    manager = SimulatedAccelerator(vram_budget=10**6)
    a = manager.get_or_load("a", lambda: linear(8))
    manager.get_or_load("b", lambda: linear(8))
    with manager.use(a):
        pass
    manager.free_all()
    assert manager.loaded_keys() == []
    assert manager.transfers[-1] == (id(a), "cpu")
    stats = manager.stats()
    assert stats.bytes_by_device == {} and stats.entries == []
    assert stats.as_dict()["drops"] == 2


def test_drop_one_key():
    manager = ModelManager(device="cpu")
    manager.get_or_load("a", lambda: linear(2))
    assert manager.times_dropped("a") == 0
    assert manager.drop("a") is True
    assert manager.times_dropped("a") == 1
    assert manager.drop("a") is False
    assert "a" not in manager


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_real_cuda_offload_round_trip():
    size = module_nbytes(linear(256))
    manager = ModelManager(device="cuda", vram_budget=size)
    a = manager.get_or_load("a", lambda: linear(256))
    b = manager.get_or_load("b", lambda: linear(256))
    weight = a.weight.detach().clone()
    with manager.use(a):
        assert a.weight.device.type == "cuda"
    with manager.use(b):
        assert b.weight.device.type == "cuda"
        assert a.weight.device.type == "cpu"
    assert torch.equal(a.weight, weight)
    assert manager.dtype_for("diffusion") == torch.float16
