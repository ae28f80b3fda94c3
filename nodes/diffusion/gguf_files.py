"""GGUF-quantised diffusion transformers (the files of the ComfyUI-GGUF pack: original single-file names inside,
Q8_0 / Q4_K / ... or F16 tensors) loaded through diffusers' GGUF support.

diffusers reads the file (load_gguf_checkpoint: quantised tensors stay packed bytes as GGUFParameter) and its
GGUFLinear dequantises a layer's weight on every call, in the compute dtype: memory holds the quantised bytes.
The family is detected from the tensors' logical shapes, names are converted as for safetensors files (the splits
of fused projections cut whole rows, which keeps the packed blocks intact), and the network is assembled here.
Tensors the file keeps unquantised (F16 / F32: biases, norms, small layers) are stored as for a safetensors file
(nodes.diffusion.weight_storage). Needs the `gguf` package (the `gguf` extra).
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import families, weight_storage
from .latent_formats import latent_format_for_family
from .models import DiffusionModel, SamplingConfig
from .offline import ensure_offline


class GGUFFileError(ValueError):
    """A .gguf file that cannot be loaded; the message names the file."""


def read_gguf(path: Path) -> dict[str, torch.Tensor]:
    """The file's tensors: GGUFParameter (packed bytes + quant type) for quantised ones, plain tensors for F16/F32."""
    ensure_offline()
    try:
        import gguf  # noqa: F401  (diffusers checks for it; a clear message beats its ImportError)
    except ImportError as error:
        raise GGUFFileError(f"{path.name}: reading .gguf files needs the 'gguf' package "
                            f"(pip install 'latentloom[gguf]')") from error
    from diffusers.models.model_loading_utils import load_gguf_checkpoint

    try:
        return load_gguf_checkpoint(str(path))
    except (ValueError, OSError, KeyError) as error:
        raise GGUFFileError(f"{path.name}: not a readable GGUF file ({type(error).__name__}: {error})") from error


def logical_shapes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Meta tensors with each tensor's unpacked shape (what the family detection reads)."""
    return {key: torch.empty(tuple(getattr(value, "quant_shape", value.shape)), device="meta")
            for key, value in state.items()}


def _assign(network: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    for key, value in weights.items():
        owner_name, _, leaf = key.rpartition(".")
        owner = network.get_submodule(owner_name)
        if leaf in owner._parameters:
            if not isinstance(value, torch.nn.Parameter):
                value = torch.nn.Parameter(value, requires_grad=False)
            owner._parameters[leaf] = value
        else:
            owner._buffers[leaf] = value


def load_gguf_unet(path: Path, compute: torch.dtype) -> DiffusionModel:
    """A GGUF diffusion transformer as a DiffusionModel computing in `compute`."""
    state = read_gguf(path)  # first: it names a missing gguf package
    from diffusers.quantizers.gguf.utils import GGUFLinear, GGUFParameter, _replace_with_gguf_linear

    from .gguf_linear import InputDtypeGGUFLinear

    try:
        found = families.detect_transformer(logical_shapes(state))
        weights = families.diffusers_weights(state, found)
    except families.UnknownTransformer as error:
        raise GGUFFileError(f"{path.name}: GGUF files of diffusion transformers (Flux, SD3, ...) are supported; "
                            f"{error}; found {families.describe_keys(state)}") from error
    with torch.device("meta"):
        network = families.transformer_class(found.family)(**found.config)
        _replace_with_gguf_linear(network, compute, weights)  # Linear layers with packed weights -> GGUFLinear
    for module in network.modules():
        if type(module) is GGUFLinear:
            module.__class__ = InputDtypeGGUFLinear
    families.rebuild_rotary_tables(network, found)
    own = set(network.state_dict())
    if own != set(weights):
        missing, unexpected = sorted(own - set(weights)), sorted(set(weights) - own)
        raise GGUFFileError(f"{path.name}: weights do not fit the detected {found.family} architecture "
                            f"(missing {missing[:4]}, unexpected {unexpected[:4]})")
    packed = {key: value for key, value in weights.items() if isinstance(value, GGUFParameter)}
    plain = {key: value for key, value in weights.items() if key not in packed}
    storage = weight_storage.storage_dtype("default", weight_storage.file_weight_dtype(plain), compute)
    stored = weight_storage.stored_weight_names(network) if storage is not None else set()
    _assign(network, {**packed, **weight_storage.cast_state(plain, stored, storage, compute)})
    if storage is not None:
        weight_storage.enable_per_call_cast(network, compute)
    # Recorded in every case: the first parameter is packed bytes, not the compute dtype.
    setattr(network, weight_storage.COMPUTE_DTYPE_ATTRIBUTE, compute)
    left = [name for name, tensor in [*network.named_parameters(), *network.named_buffers()] if tensor.is_meta]
    if left:
        raise GGUFFileError(f"{path.name}: no value for {left[:4]}")
    network.eval().requires_grad_(False)
    return DiffusionModel(unet=network, family=found.family,
                          sampling=SamplingConfig(**families.default_sampling(found)),
                          latent_format=latent_format_for_family(found.family), source=str(path),
                          options={"variant": found.variant})
