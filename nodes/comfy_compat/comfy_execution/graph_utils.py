"""`comfy_execution.graph_utils.GraphBuilder`: builds the API-format fragment a node returns in "expand"."""

from __future__ import annotations

from typing import Any


def is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


class GraphNode:
    def __init__(self, node_id: str, class_type: str, inputs: dict[str, Any]):
        self.id = node_id
        self.class_type = class_type
        self.inputs = dict(inputs)

    def out(self, index: int) -> list[Any]:
        return [self.id, index]

    def set_input(self, key: str, value: Any) -> None:
        if value is None:
            self.inputs.pop(key, None)
        else:
            self.inputs[key] = value

    def get_input(self, key: str) -> Any:
        return self.inputs.get(key)

    def serialize(self) -> dict[str, Any]:
        return {"class_type": self.class_type, "inputs": dict(self.inputs)}


class GraphBuilder:
    """Node ids are local to the fragment; the engine prefixes them with the expanding node's id."""

    def __init__(self, prefix: str = ""):
        self.prefix = prefix
        self.nodes: dict[str, GraphNode] = {}
        self._next_id = 1

    def node(self, class_type: str, id: str | None = None, **inputs: Any) -> GraphNode:
        if id is None:
            id = str(self._next_id)
            self._next_id += 1
        node_id = self.prefix + str(id)
        node = GraphNode(node_id, class_type, inputs)
        self.nodes[node_id] = node
        return node

    def lookup_node(self, id: str) -> GraphNode | None:
        return self.nodes.get(self.prefix + str(id))

    def finalize(self) -> dict[str, dict[str, Any]]:
        return {node_id: node.serialize() for node_id, node in self.nodes.items()}
