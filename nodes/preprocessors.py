"""Image preprocessors for ControlNet hints, with ComfyUI's class names and inputs: Canny."""

from __future__ import annotations

from typing import Annotated, Any

from latentloom.engine.node import Node
from latentloom.engine.types import IMAGE, Float, Output, Socket

from .diffusion.canny import canny_edges

THRESHOLD = Float(min=0.01, max=0.99, step=0.01)


def _compute_device(ctx: Any) -> Any:
    manager = getattr(getattr(ctx, "env", None), "services", {}).get("models")
    return getattr(manager, "device", None)


class Canny(Node):
    display_name = "Canny"
    category = "image/preprocessors"
    description = "Edge map of an image (kornia's Canny, as ComfyUI): a hint for edge ControlNets."
    outputs = (Output(IMAGE),)
    image: Annotated[Any, Socket(IMAGE)]
    low_threshold: Annotated[float, THRESHOLD] = 0.4
    high_threshold: Annotated[float, THRESHOLD] = 0.8

    def run(self, ctx):
        node = type(self).__name__
        if self.low_threshold > self.high_threshold:
            raise ValueError(f"{node}: input 'low_threshold' ({self.low_threshold}) must not exceed "
                             f"'high_threshold' ({self.high_threshold})")
        try:
            return (canny_edges(self.image, self.low_threshold, self.high_threshold, _compute_device(ctx)),)
        except ValueError as error:
            raise ValueError(f"{node}: input 'image': {error}") from error


NODES = [Canny]
