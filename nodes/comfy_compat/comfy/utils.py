"""`comfy.utils`: ProgressBar (through the running node's progress events), common_upscale, load_torch_file."""

from __future__ import annotations

import io
from typing import Any

import torch

from ...diffusion.resize import bislerp, lanczos
from ...diffusion.resize import common_upscale as _common_upscale
from ..context import current_node

PROGRESS_BAR_ENABLED = True
MAX_PREVIEW_SIZE = 512


def common_upscale(samples: torch.Tensor, width: int, height: int, upscale_method: str, crop: str) -> torch.Tensor:
    """Resize [N,C,H,W] (ComfyUI's upscale methods and center crop)."""
    return _common_upscale(samples, width, height, upscale_method, crop)


def load_torch_file(ckpt: str, safe_load: bool = False, device: Any = None, return_metadata: bool = False) -> Any:
    """A state dict from .safetensors / .sft (with its metadata when asked) or a torch pickle (weights only)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    metadata = None
    if str(ckpt).lower().endswith((".safetensors", ".sft")):
        from safetensors import safe_open

        with safe_open(str(ckpt), framework="pt", device=str(device)) as handle:
            state = {key: handle.get_tensor(key) for key in handle.keys()}
            metadata = handle.metadata()
    else:
        loaded = torch.load(str(ckpt), map_location=device, weights_only=True)
        state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else loaded
    return (state, metadata) if return_metadata else state


def repeat_to_batch_size(tensor: torch.Tensor, batch_size: int, dim: int = 0) -> torch.Tensor:
    if tensor.shape[dim] > batch_size:
        return tensor.narrow(dim, 0, batch_size)
    if tensor.shape[dim] < batch_size:
        repeats = [1] * tensor.ndim
        repeats[dim] = -(-batch_size // tensor.shape[dim])
        return tensor.repeat(repeats).narrow(dim, 0, batch_size)
    return tensor


def _preview(preview: Any) -> tuple[str, bytes] | None:
    """ComfyUI's preview tuple (format, PIL image, max size) as (mime type, encoded bytes)."""
    if not isinstance(preview, tuple) or len(preview) < 2 or not hasattr(preview[1], "save"):
        return None
    kind = str(preview[0]).upper()
    image = preview[1]
    limit = preview[2] if len(preview) > 2 and preview[2] else MAX_PREVIEW_SIZE
    if max(image.size) > limit:
        image = image.copy()
        image.thumbnail((limit, limit))
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG" if kind == "PNG" else "JPEG", quality=95)
    return ("image/png" if kind == "PNG" else "image/jpeg"), buffer.getvalue()


class ProgressBar:
    """Progress of the running node, sent as the engine's progress events (where interrupts land too)."""

    def __init__(self, total: int, node_id: str | None = None):
        self.total = total
        self.current = 0
        self.node_id = node_id
        self._ctx = current_node()

    def update_absolute(self, value: int, total: int | None = None, preview: Any = None) -> None:
        if total is not None:
            self.total = total
        self.current = min(value, self.total) if self.total else value
        if self._ctx is not None:
            self._ctx.progress(int(self.current), int(self.total), _preview(preview))

    def update(self, value: int) -> None:
        self.update_absolute(self.current + value)


__all__ = ["ProgressBar", "bislerp", "common_upscale", "lanczos", "load_torch_file", "repeat_to_batch_size"]
