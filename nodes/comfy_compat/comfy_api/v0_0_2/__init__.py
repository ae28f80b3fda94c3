"""`comfy_api.v0_0_2`: packs that pin this version get the latest API, which is what we implement."""

from ..latest import ComfyExtension, comfy_io, io, ui

__all__ = ["ComfyExtension", "comfy_io", "io", "ui"]
