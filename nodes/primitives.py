"""Primitive value nodes (ComfyUI's comfy_extras.nodes_primitive): a widget whose value becomes an output."""

from __future__ import annotations

import sys
from typing import Annotated

from latentloom.engine.node import Node, RunContext
from latentloom.engine.types import BOOLEAN, FLOAT, INT, STRING, Boolean, Float, Int, Output, String


class PrimitiveString(Node):
    display_name = "String"
    category = "utils/primitive"
    outputs = (Output(STRING),)

    value: Annotated[str, String()] = ""

    def run(self, ctx: RunContext):
        return (self.value,)


class PrimitiveStringMultiline(Node):
    display_name = "String (Multiline)"
    category = "utils/primitive"
    outputs = (Output(STRING),)

    value: Annotated[str, String(multiline=True)] = ""

    def run(self, ctx: RunContext):
        return (self.value,)


class PrimitiveInt(Node):
    display_name = "Int"
    category = "utils/primitive"
    outputs = (Output(INT),)

    value: Annotated[int, Int(min=-sys.maxsize, max=sys.maxsize, control_after_generate=True)] = 0

    def run(self, ctx: RunContext):
        return (int(self.value),)


class PrimitiveFloat(Node):
    display_name = "Float"
    category = "utils/primitive"
    outputs = (Output(FLOAT),)

    value: Annotated[float, Float(min=-sys.maxsize, max=sys.maxsize)] = 0.0

    def run(self, ctx: RunContext):
        return (float(self.value),)


class PrimitiveBoolean(Node):
    display_name = "Boolean"
    category = "utils/primitive"
    outputs = (Output(BOOLEAN),)

    value: Annotated[bool, Boolean()] = False

    def run(self, ctx: RunContext):
        return (bool(self.value),)


NODES = [PrimitiveString, PrimitiveStringMultiline, PrimitiveInt, PrimitiveFloat, PrimitiveBoolean]
