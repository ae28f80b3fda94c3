"""Layers that bring their weight to their input: moved (and cast) to the input's device and dtype per call.

Two users, one mechanism (ComfyUI's "manual cast" ops serve both the same way):

* the model memory manager (engine.memory) places a model that does not fit the compute budget partly: the layers
  that do not fit keep their weights in CPU memory and are switched to these classes, so each copies its weight
  and bias to the compute device for the duration of one call (streaming);
* narrow storage dtypes (nodes.diffusion.weight_storage): fp8 weights computed in the input's dtype.

Exact nn.Linear / nn.Conv1d/2d/3d only: they hold nearly all of a network's bytes, and a subclass may read its
weight in a forward of its own. Layers are switched to subclasses of their own class, so isinstance checks,
state_dict names, in-place weight patches (applied wherever the weight lives) and device moves are unchanged.
Nothing is mutated during a call, so concurrent calls are safe.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F  # noqa: N812


def fetch(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`tensor` on `like`'s device in `like`'s dtype (itself when it already is)."""
    return tensor.to(device=like.device, dtype=like.dtype)


def _fetch_bias(tensor: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    return None if tensor is None else fetch(tensor, like)


class CastLinear(torch.nn.Linear):
    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 (torch's name)
        return F.linear(input, fetch(self.weight, input), _fetch_bias(self.bias, input))


class CastConv1d(torch.nn.Conv1d):
    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002
        output: torch.Tensor = self._conv_forward(input, fetch(self.weight, input), _fetch_bias(self.bias, input))
        return output


class CastConv2d(torch.nn.Conv2d):
    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002
        output: torch.Tensor = self._conv_forward(input, fetch(self.weight, input), _fetch_bias(self.bias, input))
        return output


class CastConv3d(torch.nn.Conv3d):
    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002
        output: torch.Tensor = self._conv_forward(input, fetch(self.weight, input), _fetch_bias(self.bias, input))
        return output


CAST_CLASSES: dict[type, type] = {torch.nn.Linear: CastLinear, torch.nn.Conv1d: CastConv1d,
                                  torch.nn.Conv2d: CastConv2d, torch.nn.Conv3d: CastConv3d}


def is_castable(module: torch.nn.Module) -> bool:
    """True for an exact Linear / Conv layer, or one already switched."""
    return type(module) in CAST_CLASSES or type(module) in CAST_CLASSES.values()


def enable_fetching(layers: Iterable[torch.nn.Module]) -> None:
    """Switch castable layers to the classes that fetch their weights per call (others are left as they are)."""
    for layer in layers:
        layer.__class__ = CAST_CLASSES.get(type(layer), type(layer))


def own_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(recurse=False), *module.buffers(recurse=False)]


def placement_units(network: torch.nn.Module) -> list[tuple[torch.nn.Module, int, bool]]:
    """The modules holding tensors of their own, in module order, as (module, bytes, can_stream). Each storage is
    counted once, at its first holder, so the bytes add up to the network's. A castable layer can stream, except
    the holder of the network's first parameter: callers read the compute device from that parameter."""
    first = next(network.parameters(), None)
    seen: set[int] = set()
    units = []
    for module in network.modules():
        tensors = own_tensors(module)
        if not tensors:
            continue
        nbytes = 0
        for tensor in tensors:
            if tensor.device.type == "meta":
                continue
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                nbytes += storage.nbytes()
        can_stream = is_castable(module) and not any(tensor is first for tensor in tensors)
        units.append((module, nbytes, can_stream))
    return units


def move_own_tensors(module: torch.nn.Module, device: torch.device) -> None:
    """Move one module's own parameters and buffers (not its children's), keeping the Parameter objects."""
    for parameter in module.parameters(recurse=False):
        parameter.data = parameter.data.to(device)
    for name, buffer in list(module.named_buffers(recurse=False)):
        setattr(module, name, buffer.to(device))
