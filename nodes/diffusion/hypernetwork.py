"""Hypernetworks (ComfyUI's HypernetworkLoader, comfy_extras/nodes_hypernetwork.py): small MLPs, one pair per
attention width, that add a learned correction to the inputs of the key and value projections of every
attention layer (self- and cross-attention) whose key width they match:

    k ← k + strength·mlp_k(k),   v ← v + strength·mlp_v(v)

File layout (a weights-only torch pickle): `{width (int): [k_layers, v_layers], "activation_func": str,
"is_layer_norm": bool, "use_dropout": bool, "activate_output": bool, "last_layer_dropout": bool, ...}`, where
each *_layers is a state dict `linear.<i>.weight/bias` in network order; with layer norms, every linear is
followed by a LayerNorm's weight/bias. The activation follows each linear except the last (unless
activate_output; with layer norms it follows every linear, as ComfyUI counts the last one). Dropout layers are
inference no-ops and are left out.

The MLPs run in float32 on the device of the attention inputs; the result is added in the inputs' dtype.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor] | None] = {
    "linear": None, "relu": F.relu, "leakyrelu": F.leaky_relu, "elu": F.elu, "swish": F.hardswish,
    "tanh": torch.tanh, "sigmoid": torch.sigmoid, "softsign": F.softsign, "mish": F.mish,
}


class HypernetworkFileError(ValueError):
    """A file that is not a hypernetwork this loader understands (the message names the file)."""


@dataclass(frozen=True)
class Layer:
    weight: torch.Tensor
    bias: torch.Tensor
    activate: bool
    norm: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass(frozen=True)
class Hypernetwork:
    """The MLP pairs by attention width: nets[width] = (key layers, value layers)."""

    nets: Mapping[int, tuple[tuple[Layer, ...], tuple[Layer, ...]]]
    activation: str = "linear"

    def run(self, layers: tuple[Layer, ...], x: torch.Tensor) -> torch.Tensor:
        function = ACTIVATIONS[self.activation]
        h = x.float()
        for layer in layers:
            h = F.linear(h, layer.weight.to(h.device), layer.bias.to(h.device))
            if layer.activate and function is not None:
                h = function(h)
            if layer.norm is not None:
                weight, bias = layer.norm
                h = F.layer_norm(h, (weight.shape[0],), weight.to(h.device), bias.to(h.device))
        return h


def _layers(state: Mapping[str, Any], activation: str, layer_norm: bool, activate_output: bool,
            where: str) -> tuple[Layer, ...]:
    weights = [key[: -len(".weight")] for key in state if isinstance(key, str) and key.endswith(".weight")]
    layers: list[Layer] = []
    index = 0
    try:
        while index < len(weights):
            name = weights[index]
            # As ComfyUI counts it: the index among all .weight entries, so with layer norms no linear is "last"
            # and the activation follows every one of them.
            last = index == len(weights) - 1
            weight = state[f"{name}.weight"].float()
            bias = state[f"{name}.bias"].float()
            if weight.ndim != 2 or bias.shape != weight.shape[:1]:
                raise HypernetworkFileError(f"{where}: '{name}' is not a linear layer")
            norm = None
            if layer_norm:
                index += 1
                norm_name = weights[index]
                norm = (state[f"{norm_name}.weight"].float(), state[f"{norm_name}.bias"].float())
            activate = activation != "linear" and (not last or activate_output)
            layers.append(Layer(weight, bias, activate, norm))
            index += 1
    except (KeyError, IndexError, AttributeError) as error:
        raise HypernetworkFileError(f"{where}: incomplete layers ({error})") from error
    return tuple(layers)


def parse_hypernetwork(data: Mapping[Any, Any], name: str) -> Hypernetwork:
    activation = str(data.get("activation_func", "linear"))
    if activation not in ACTIVATIONS:
        raise HypernetworkFileError(f"{name}: unsupported activation_func {activation!r} "
                                    f"(supported: {', '.join(ACTIVATIONS)})")
    layer_norm = bool(data.get("is_layer_norm", False))
    activate_output = bool(data.get("activate_output", False))
    nets: dict[int, tuple[tuple[Layer, ...], tuple[Layer, ...]]] = {}
    for key, value in data.items():
        try:
            width = int(key)
        except (TypeError, ValueError):
            continue
        if not isinstance(value, (list, tuple)) or len(value) < 2 or not all(isinstance(v, Mapping)
                                                                               for v in value[:2]):
            raise HypernetworkFileError(f"{name}: entry {key!r} is not a pair of layer dictionaries")
        pair = tuple(_layers(value[i], activation, layer_norm, activate_output, f"{name} [{key}][{i}]")
                     for i in (0, 1))
        for layers in pair:
            if layers and (layers[0].weight.shape[1] != width or layers[-1].weight.shape[0] != width):
                raise HypernetworkFileError(f"{name}: the layers of entry {key!r} do not map width {width} "
                                            f"to itself")
        nets[width] = (pair[0], pair[1])
    if not nets:
        raise HypernetworkFileError(f"{name}: no hypernetwork layers (no entries keyed by attention width)")
    return Hypernetwork(nets, activation)


def read_hypernetwork(path: str | os.PathLike[str]) -> Hypernetwork:
    """A hypernetwork file, loaded with torch.load(weights_only=True): a pickle needing more than tensors,
    numbers, strings and containers is refused, never executed."""
    path = Path(path)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise HypernetworkFileError(f"{path.name}: refused to load: the pickle needs more than tensors "
                                    f"({str(error).splitlines()[0]})") from error
    except Exception as error:  # zip / truncated-file errors come in many types
        raise HypernetworkFileError(f"{path.name}: not a readable hypernetwork file "
                                    f"({type(error).__name__}: {error})") from error
    if not isinstance(data, Mapping):
        raise HypernetworkFileError(f"{path.name}: holds a {type(data).__name__}, not a dictionary")
    return parse_hypernetwork(data, path.name)


@dataclass(frozen=True, eq=False)
class HypernetworkPatch:
    """An attn1/attn2 patch (n, context, value, extra) -> same, as ComfyUI's: the value input defaults to the
    context, and both get their width's MLP correction."""

    network: Hypernetwork
    strength: float

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None,
                 extra_options: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        pair = self.network.nets.get(k.shape[-1])
        if pair is None:
            return q, k, v
        value = k if v is None else v
        k = k + (self.network.run(pair[0], k) * self.strength).to(k.dtype)
        value = value + (self.network.run(pair[1], value) * self.strength).to(value.dtype)
        return q, k, value
