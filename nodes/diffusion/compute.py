"""How the UNet is run: in which dtype (ModelComputeDtype) and whether through torch.compile (TorchCompileModel).

Both are model options (copied with the MODEL, so they affect only the branch that set them) read once per
sampling pass by `network_for`, which returns the callable ModelCall uses in place of the UNet module:

* a compute dtype other than the weights' runs the UNet on a copy of its floating-point parameters cast to that
  dtype (made on the first call of the pass, after the weight patches were applied, and dropped with the pass);
  the shared module's weights are never converted. ComfyUI does the same by casting weights layer by layer.
* torch.compile wraps the module once per (settings object, module) and sits below the model-function wrapper,
  as ComfyUI's APPLY_MODEL wrapper swaps in the compiled diffusion model. Parameters stay graph inputs, so LoRA
  and other in-place weight patches are seen without recompiling.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping
from typing import Any, cast

import torch

from .weight_storage import network_compute_dtype, per_call_cast_names

COMPUTE_DTYPE = "model_compute_dtype"  # option key: a torch.dtype
TORCH_COMPILE = "torch_compile"  # option key: a TorchCompile

COMPUTE_DTYPES: dict[str, torch.dtype | None] = {
    "default": None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
}
COMPILE_BACKENDS = ("inductor", "cudagraphs")


class TorchCompile:
    """torch.compile settings plus the compiled wrapper of each module they were used on."""

    def __init__(self, backend: str, mode: str | None = None, fullgraph: bool = False, dynamic: bool | None = None):
        self.backend = backend
        self.mode = mode
        self.fullgraph = fullgraph
        self.dynamic = dynamic
        self._compiled: weakref.WeakKeyDictionary[torch.nn.Module, torch.nn.Module] = weakref.WeakKeyDictionary()

    def compiled(self, module: torch.nn.Module) -> torch.nn.Module:
        """The OptimizedModule wrapping `module` (made once; it shares the module's parameters)."""
        found = self._compiled.get(module)
        if found is None:
            compiled = torch.compile(module, backend=self.backend, mode=self.mode, fullgraph=self.fullgraph,
                                     dynamic=self.dynamic)
            found = cast(torch.nn.Module, compiled)
            self._compiled[module] = found
        return found

    def __repr__(self) -> str:
        return f"TorchCompile(backend={self.backend!r})"


class CastNetwork:
    """`module` run with its floating-point parameters and buffers cast to `dtype` (cast once, on first use)."""

    def __init__(self, module: torch.nn.Module, dtype: torch.dtype, call: torch.nn.Module | None = None,
                 prefix: str = ""):
        self.module = module
        self.dtype = dtype
        self.call = call if call is not None else module  # e.g. the compiled wrapper of `module`
        self.prefix = prefix  # how `call` names the module's tensors ("_orig_mod." for a compiled module)
        self._tensors: dict[str, torch.Tensor] | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._tensors is None:
            named = [*self.module.named_parameters(), *self.module.named_buffers()]
            cast_per_call = per_call_cast_names(self.module)  # stored narrow weights: their layers cast them
            self._tensors = {self.prefix + name: tensor.detach().to(self.dtype) for name, tensor in named
                             if tensor.is_floating_point() and name not in cast_per_call}
        return torch.func.functional_call(self.call, self._tensors, args, kwargs, strict=False)


def compute_dtype(options: Mapping[str, Any], unet: torch.nn.Module) -> torch.dtype:
    """The dtype the UNet runs in: the option's, else that of its weights (the recorded compute dtype when its
    weights are stored narrower and cast per call: nodes.diffusion.weight_storage)."""
    chosen = options.get(COMPUTE_DTYPE)
    return chosen if chosen is not None else network_compute_dtype(unet)


def network_for(unet: torch.nn.Module, options: Mapping[str, Any]) -> Callable[..., Any]:
    """What to call in place of `unet` for one sampling pass, given the model's options."""
    settings = options.get(TORCH_COMPILE)
    call: torch.nn.Module = unet
    prefix = ""
    if settings is not None:
        call = settings.compiled(unet)
        prefix = "_orig_mod."  # how the compiled wrapper names the module's tensors
    dtype = compute_dtype(options, unet)
    if dtype != network_compute_dtype(unet):
        return CastNetwork(unet, dtype, call, prefix)
    return call
