"""diffusers' GGUFLinear, computing in its input's dtype when asked to (imported only once the gguf package is
known to be installed, and after nodes.diffusion.gguf_files.read_gguf made the hub offline: diffusers' GGUF module
imports gguf)."""

from __future__ import annotations

import torch
from diffusers.quantizers.gguf.utils import GGUFLinear, dequantize_gguf_tensor


class InputDtypeGGUFLinear(GGUFLinear):
    """diffusers' GGUFLinear, computing in its input's dtype when that differs from the one it was built for (a
    ModelComputeDtype override); as built, diffusers' own path (with its fused CUDA kernels where installed)."""

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if inputs.dtype == self.compute_dtype:
            return super().forward(inputs)
        weight = dequantize_gguf_tensor(self.weight).to(inputs.dtype)
        bias = None if self.bias is None else self.bias.to(inputs.dtype)
        return torch.nn.functional.linear(inputs, weight, bias)
