"""Weights kept in a narrow storage dtype and computed in a wider one ("manual cast", as ComfyUI's fp8 loading).

UNETLoader's weight_dtype fp8_* (or a file whose weights already are fp8, or 16-bit weights on a device that
computes in fp32) keeps the weights of the network's Linear and Conv layers in that dtype in memory: they hold
nearly all of a diffusion model's bytes. Each such layer casts its weight to the dtype of its input on every call,
so a full-precision copy of one layer exists only while that layer runs (the layer classes live in
engine.layer_streaming: the memory manager's weight streaming uses them too). Everything else (biases, norms,
embeddings, buffers) is kept in the compute dtype: it is small, and diffusers' norm code multiplies by its weight
directly.

The layers are switched to subclasses of their own class (isinstance checks, state_dict names, in-place weight
patches and device moves are unchanged); nothing is mutated during a call, so concurrent calls are safe.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

from latentloom.engine.layer_streaming import (  # noqa: F401 (CastConv*: the layer classes, re-exported)
    CAST_CLASSES,
    CastConv1d,
    CastConv2d,
    CastConv3d,
    CastLinear,
    enable_fetching,
    is_castable,
)

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
# UNETLoader's weight_dtype -> storage dtype ("_fast" selects fp8 matrix multiplies in ComfyUI on GPUs that have
# them; here it stores the same way and computes by casting).
WEIGHT_DTYPE_OPTIONS: dict[str, torch.dtype | None] = {
    "default": None, "fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e4m3fn_fast": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}
COMPUTE_DTYPE_ATTRIBUTE = "stored_weights_compute_dtype"  # set on a network whose layers cast per call


def _castable_layers(network: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module]]:
    for name, module in network.named_modules():
        if is_castable(module):
            yield name, module


def stored_weight_names(network: torch.nn.Module) -> set[str]:
    """state_dict names of the weights that would be kept in the storage dtype (works on a meta network)."""
    return {f"{name}.weight" if name else "weight" for name, _ in _castable_layers(network)}


def file_weight_dtype(state: Mapping[str, torch.Tensor]) -> torch.dtype | None:
    """The dtype that holds most of a file's floating-point bytes (None for a file without floating tensors)."""
    totals: dict[torch.dtype, int] = {}
    for tensor in state.values():
        if tensor.is_floating_point():
            totals[tensor.dtype] = totals.get(tensor.dtype, 0) + tensor.numel() * tensor.element_size()
    return max(totals, key=lambda dtype: totals[dtype]) if totals else None


def storage_dtype(weight_dtype: str, file_dtype: torch.dtype | None, compute_dtype: torch.dtype) \
        -> torch.dtype | None:
    """The dtype to keep the layers' weights in, or None to keep them in the compute dtype (no casting):
    the weight_dtype option's fp8 type; else an fp8 file's own type (never upcast at load); else a 16-bit file's
    type when the compute dtype is wider (fp32 on a CPU), halving the memory at the same numerics."""
    chosen = WEIGHT_DTYPE_OPTIONS[weight_dtype]
    if chosen is None and file_dtype in FP8_DTYPES:
        chosen = file_dtype
    if chosen is None and file_dtype in (torch.float16, torch.bfloat16) and compute_dtype == torch.float32:
        chosen = file_dtype
    return None if chosen == compute_dtype else chosen


def cast_state(state: Mapping[str, torch.Tensor], stored: set[str], storage: torch.dtype | None,
               compute: torch.dtype) -> dict[str, torch.Tensor]:
    """Own copies of the file's tensors: the `stored` weights in `storage` (when given), other floating-point
    tensors in `compute`, integer tensors as they are. A tensor given under several names (T5's embedding as
    shared.weight and encoder.embed_tokens.weight) is copied once, so the network holds it once."""
    out: dict[str, torch.Tensor] = {}
    copies: dict[tuple[int, torch.dtype | None], torch.Tensor] = {}
    for key, value in state.items():
        dtype = None if not value.is_floating_point() else \
            storage if storage is not None and key in stored else compute
        found = copies.get((id(value), dtype))
        if found is None:
            found = value.clone() if dtype is None else value.to(dtype, copy=True)
            copies[(id(value), dtype)] = found
        out[key] = found
    return out


def enable_per_call_cast(network: torch.nn.Module, compute: torch.dtype) -> torch.nn.Module:
    """Make the Linear / Conv layers cast their weights to their input's dtype per call, and record the compute
    dtype on the network (compute.compute_dtype reads it: the first parameter's dtype is the storage one)."""
    enable_fetching(module for _, module in _castable_layers(network))
    setattr(network, COMPUTE_DTYPE_ATTRIBUTE, compute)
    return network


def network_compute_dtype(network: torch.nn.Module) -> torch.dtype:
    """The dtype a network computes in: the recorded one of a network with stored weights, else its weights'."""
    recorded = getattr(network, COMPUTE_DTYPE_ATTRIBUTE, None)
    return recorded if recorded is not None else next(network.parameters()).dtype


def per_call_cast_names(network: torch.nn.Module) -> set[str]:
    """Names of the weights a network casts per call (a dtype override must not copy them: they are cast as the
    layer runs)."""
    if getattr(network, COMPUTE_DTYPE_ATTRIBUTE, None) is None:
        return set()
    return {f"{name}.weight" if name else "weight" for name, module in network.named_modules()
            if type(module) in CAST_CLASSES.values()}
