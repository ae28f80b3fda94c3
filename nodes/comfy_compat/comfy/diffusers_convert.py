"""`comfy.diffusers_convert`: diffusers-layout weights into the single-file layout, over our converters."""

from __future__ import annotations

from typing import Any


def load_diffusers(model_path: str, output_vae: bool = True, output_clip: bool = True,
                   embedding_directory: Any = None) -> tuple[Any, Any, Any]:
    """A diffusers folder as (MODEL, CLIP, VAE) views, as comfy.diffusers_load.load_diffusers returns."""
    from .sd import load_diffusers_folder

    return load_diffusers_folder(model_path, output_vae, output_clip)
