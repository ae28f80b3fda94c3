"""Image preprocessors for ControlNet hints, with ComfyUI's class names and inputs: Canny."""

from __future__ import annotations

from typing import Annotated, Any

from latentloom.engine.inputs import InputError
from latentloom.engine.node import Node, RunContext
from latentloom.engine.types import IMAGE, Float, Output, Socket

from .diffusion.canny import canny_edges

THRESHOLD = Float(min=0.01, max=0.99, step=0.01)


class Canny(Node):
    display_name = "Canny"
    category = "image/preprocessors"
    description = "Edge map of an image (kornia's Canny, as ComfyUI): a hint for edge ControlNets."
    outputs = (Output(IMAGE),)
    image: Annotated[Any, Socket(IMAGE)]
    low_threshold: Annotated[float, THRESHOLD] = 0.4
    high_threshold: Annotated[float, THRESHOLD] = 0.8

    def run(self, ctx: RunContext):
        if self.low_threshold > self.high_threshold:
            raise InputError("low_threshold", f"{self.low_threshold} must not exceed 'high_threshold' "
                             f"({self.high_threshold})")
        try:
            return (canny_edges(self.image, self.low_threshold, self.high_threshold, ctx.models.device),)
        except ValueError as error:
            raise InputError("image", str(error)) from error


NODES = [Canny]
