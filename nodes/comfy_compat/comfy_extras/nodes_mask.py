"""`comfy_extras.nodes_mask`: `composite`, over our image compositing. Unlike ComfyUI's, it returns a new tensor
and leaves `destination` unchanged; packs use the returned value."""

from __future__ import annotations

import torch

from ...imaging import composite as _composite


def composite(destination: torch.Tensor, source: torch.Tensor, x: int, y: int, mask: torch.Tensor | None = None,
              multiplier: int = 8, resize_source: bool = False) -> torch.Tensor:
    return _composite(destination, source, x, y, mask, multiplier, resize_source)
