"""A pack in latentloom's own style (NODES), next to ComfyUI ones."""

from typing import Annotated, Any

from latentloom.engine.node import Node
from latentloom.engine.types import FLOAT, Output, Socket


class OurNegate(Node):
    category = "pack/ours"
    outputs = (Output(FLOAT),)
    value: Annotated[Any, Socket(FLOAT)]

    def run(self, ctx):
        return (-self.value,)


NODES = [OurNegate]
