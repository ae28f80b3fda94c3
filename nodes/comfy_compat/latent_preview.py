"""ComfyUI's `latent_preview` for packs that run their own sampling loops: a Latent2RGB previewer over our preview
projection, and `prepare_callback`, whose callback reports progress (and a preview when the run asked for
previews) through the running node, as our samplers do. TAESD previews are not provided (Latent2RGB is used)."""

from __future__ import annotations

from typing import Any

import torch

from ..diffusion.preview import MAX_PREVIEW_SIZE, latent_to_rgb
from ..sampling import wants_previews
from .context import current_node
from .model_objects import engine_value

MAX_PREVIEW_RESOLUTION = MAX_PREVIEW_SIZE


class LatentPreviewer:
    def decode_latent_to_preview(self, x0: torch.Tensor) -> Any:
        raise NotImplementedError

    def decode_latent_to_preview_image(self, preview_format: str, x0: torch.Tensor) -> tuple[str, Any, int]:
        return preview_format, self.decode_latent_to_preview(x0), MAX_PREVIEW_RESOLUTION


class Latent2RGBPreviewer(LatentPreviewer):
    """The x0 estimate projected to RGB with the latent format's factors (a PIL image)."""

    def __init__(self, latent_format: Any):
        self.latent_format = latent_format

    def decode_latent_to_preview(self, x0: torch.Tensor) -> Any:
        from PIL import Image

        rgb = latent_to_rgb(x0[:1], self.latent_format)
        if rgb is None:
            raise ValueError("this latent format has no RGB projection for previews")
        return Image.fromarray(rgb.numpy(), "RGB")


def get_previewer(device: Any, latent_format: Any) -> LatentPreviewer | None:
    """A previewer for the running node when its run asked for previews, else None (as ComfyUI with none)."""
    ctx = current_node()
    if ctx is None or not wants_previews(ctx) or getattr(latent_format, "rgb_factors", None) is None:
        return None
    return Latent2RGBPreviewer(latent_format)


def prepare_callback(model: Any, steps: int, x0_output_dict: dict[str, Any] | None = None) -> Any:
    """A sampler callback `(step, x0, x, total_steps)` that reports the running node's progress."""
    ctx = current_node()
    latent_format = getattr(engine_value(model), "latent_format", None)
    previewer = get_previewer(None, latent_format)

    def callback(step: int, x0: torch.Tensor, x: torch.Tensor, total_steps: int) -> None:
        if x0_output_dict is not None:
            x0_output_dict["x0"] = x0
        if ctx is None:
            return
        preview = None
        if previewer is not None:
            import io

            buffer = io.BytesIO()
            previewer.decode_latent_to_preview(x0).save(buffer, format="JPEG", quality=95)
            preview = ("image/jpeg", buffer.getvalue())
        ctx.progress(step + 1, total_steps, preview)

    return callback
