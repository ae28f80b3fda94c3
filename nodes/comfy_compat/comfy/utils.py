"""`comfy.utils`: ProgressBar (through the running node's progress events), common_upscale, load_torch_file /
save_torch_file, tiled_scale (our tiled upscaler), state-dict and attribute helpers."""

from __future__ import annotations

import io
from typing import Any

import torch

from ...diffusion.resize import bislerp, lanczos
from ...diffusion.resize import common_upscale as _common_upscale
from ...diffusion.tiling import tiled_apply
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


def save_torch_file(sd: dict[str, torch.Tensor], ckpt: str, metadata: dict[str, str] | None = None) -> None:
    """A state dict to .safetensors, written as our own save nodes write (a hidden part file renamed over the
    target, tensor by tensor): a pack's save node killed mid-write leaves no partial model in output."""
    from ...diffusion.saving import write_safetensors

    write_safetensors(ckpt, sd, metadata)


def state_dict_prefix_replace(state_dict: dict[str, Any], replace_prefix: dict[str, str],
                              filter_keys: bool = False) -> dict[str, Any]:
    """Rename keys by prefix (`{old: new}`); with filter_keys only the renamed keys are kept, in a new dict,
    otherwise `state_dict` is changed in place and returned (ComfyUI's contract)."""
    out: dict[str, Any] = {} if filter_keys else state_dict
    for old, new in replace_prefix.items():
        for key in [k for k in state_dict if k.startswith(old)]:
            out[new + key[len(old):]] = state_dict.pop(key) if not filter_keys else state_dict[key]
    return out


def get_attr(obj: Any, attr: str) -> Any:
    for name in attr.split("."):
        obj = getattr(obj, name)
    return obj


def set_attr(obj: Any, attr: str, value: Any) -> Any:
    """Set a dotted attribute (a tensor becomes a frozen Parameter, as ComfyUI); the previous value is returned."""
    *parents, last = attr.split(".")
    for name in parents:
        obj = getattr(obj, name)
    previous = getattr(obj, last)
    setattr(obj, last, torch.nn.Parameter(value, requires_grad=False) if isinstance(value, torch.Tensor) else value)
    return previous


def get_tiled_scale_steps(width: int, height: int, tile_x: int, tile_y: int, overlap: int) -> int:
    """How many tiles tiled_scale visits for one image (for a ProgressBar total)."""
    rows = -(-(height - overlap) // max(1, tile_y - overlap)) if height > overlap else 1
    cols = -(-(width - overlap) // max(1, tile_x - overlap)) if width > overlap else 1
    return rows * cols


def tiled_scale(samples: torch.Tensor, function: Any, tile_x: int = 64, tile_y: int = 64, overlap: int = 8,
                upscale_amount: float = 4, out_channels: int = 3, output_device: Any = "cpu",
                pbar: ProgressBar | None = None) -> torch.Tensor:
    """Apply `function` ([1,C,h,w] -> [1,out_channels,h*s,w*s]) tile by tile over [B,C,H,W] with feathered
    overlaps (our tiler: the same tiling idea as ComfyUI's, so values at tile seams may differ slightly)."""
    on_tile = (lambda: pbar.update(1)) if pbar is not None else None
    device = samples.device  # the tiler works on the CPU; `function` gets tiles where the pack put its samples

    def on_device(tile: torch.Tensor) -> torch.Tensor:
        return function(tile.to(device)).float().cpu()

    result = tiled_apply(samples.float().cpu(), on_device, (tile_y, tile_x), overlap, upscale_amount, out_channels,
                         on_tile=on_tile)
    return result.to(output_device)


def tiled_scale_multidim(samples: torch.Tensor, function: Any, tile: tuple[int, ...] = (64, 64), overlap: int = 8,
                         upscale_amount: float = 4, out_channels: int = 3, output_device: Any = "cpu",
                         downscale: bool = False, index_formulas: Any = None, pbar: ProgressBar | None = None
                         ) -> torch.Tensor:
    """tiled_scale for 2-D tiles (image latents); video tiles (3-D) are not provided."""
    if len(tile) != 2 or samples.ndim != 4:
        raise NotImplementedError("comfy.utils.tiled_scale_multidim: only 2-D tiles over [B,C,H,W] are supported")
    scale = 1 / upscale_amount if downscale else upscale_amount
    return tiled_scale(samples, function, tile[1], tile[0], overlap, scale, out_channels, output_device, pbar)


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


__all__ = ["ProgressBar", "bislerp", "common_upscale", "get_attr", "get_tiled_scale_steps", "lanczos",
           "load_torch_file", "repeat_to_batch_size", "save_torch_file", "set_attr", "state_dict_prefix_replace",
           "tiled_scale", "tiled_scale_multidim"]
