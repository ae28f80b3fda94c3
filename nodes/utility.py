"""General-purpose nodes that need no model: strings and a text preview output."""

from __future__ import annotations

import json
from typing import Annotated, Any

from latentloom.engine.node import Node, NodeOutput, RunContext
from latentloom.engine.types import ANY, STRING, Output, Socket, String


class StringConcatenate(Node):
    category = "utils/string"
    display_name = "Concatenate"
    outputs = (Output(STRING),)
    string_a: Annotated[str, String(multiline=True)] = ""
    string_b: Annotated[str, String(multiline=True)] = ""
    delimiter: Annotated[str, String()] = ""

    def run(self, ctx: RunContext):
        return (f"{self.string_a}{self.delimiter}{self.string_b}",)


class PreviewAny(Node):
    """Shows any value as text in the client (and in the CLI's output)."""

    category = "utils"
    display_name = "Preview Any"
    output_node = True
    source: Annotated[Any, Socket(ANY)]

    def run(self, ctx: RunContext):
        value = self.source
        if isinstance(value, (dict, list, int, float, bool)) or value is None:
            text = json.dumps(value, default=str)
        else:
            text = str(value)
        return NodeOutput(values=(), ui={"text": [text]})


NODES = [StringConcatenate, PreviewAny]
