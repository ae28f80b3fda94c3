"""API prompt -> UI (LiteGraph) workflow with an automatic left-to-right layout.

Nodes are placed in columns by longest-path layering (a node sits one column right of its furthest-right
input source; input-less nodes sit just left of their first consumer) and stacked top to bottom inside a
column, ordered by where their sources sit so links cross less. Widget values are written in catalogue
order with the editor's companion widgets filled in (control_after_generate = "fixed", so opening and
running the file does not change the seed). Converting the result back with ui_to_api gives the same
prompt; the ComfyUI frontend's own Export (API) of it does too (checked with tools/frontend_export.py).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass, field
from typing import Any, TypeGuard

import networkx as nx

from latentloom.engine.workflow.catalogue import NodeLayout, WorkflowFormatError, node_layout
from latentloom.engine.workflow.ui_to_api import MissingNodeTypesError

COLUMN_GAP = 90
ROW_GAP = 50
TITLE_HEIGHT = 30
SLOT_HEIGHT = 22
WIDGET_HEIGHT = 26
MULTILINE_HEIGHT = 120
NODE_WIDTH = 320
WIDE_NODE_WIDTH = 420
ORIGIN = (0.0, 0.0)


def _is_link(value: Any) -> TypeGuard[list[Any] | tuple[Any, ...]]:
    return (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and isinstance(value[0], (str, int))
        and not isinstance(value[0], bool)
        and isinstance(value[1], int)
        and not isinstance(value[1], bool)
    )


def _unwrap(value: Any) -> Any:
    if isinstance(value, dict) and set(value) <= {"__value__", "__type__"} and "__value__" in value:
        return value["__value__"]
    return value


@dataclass
class _UiNode:
    api_id: str
    ui_id: int
    class_type: str
    layout: NodeLayout
    entry: dict[str, Any]
    inputs: list[dict[str, Any]] = field(default_factory=list)
    outputs: list[dict[str, Any]] = field(default_factory=list)
    widgets_values: list[Any] = field(default_factory=list)
    size: tuple[float, float] = (NODE_WIDTH, 100.0)


def _check_prompt(prompt: Any, catalogue: dict[str, dict[str, Any]]) -> None:
    if not isinstance(prompt, dict) or not prompt:
        raise WorkflowFormatError("an API prompt must be a non-empty JSON object of node id -> node")
    missing = []
    for node_id, entry in prompt.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("class_type"), str):
            raise WorkflowFormatError(f"API node {node_id!r}: needs a 'class_type' string and an 'inputs' object")
        if not isinstance(entry.get("inputs", {}), dict):
            raise WorkflowFormatError(f"API node {node_id!r}: 'inputs' must be an object")
        if entry["class_type"] not in catalogue:
            missing.append(entry["class_type"])
    if missing:
        raise MissingNodeTypesError(missing)


def _assign_ui_ids(prompt: dict[str, Any]) -> dict[str, int]:
    """Numeric API ids are kept; others (e.g. flattened subgraph ids "12:5") get fresh numbers after them."""
    numeric = {node_id: int(node_id) for node_id in prompt if str(node_id).isdigit()}
    next_id = max(numeric.values(), default=0) + 1
    ids = dict(numeric)
    for node_id in prompt:
        if node_id not in ids:
            ids[node_id] = next_id
            next_id += 1
    return ids


def _layers(graph: nx.DiGraph, order: list[str]) -> dict[str, int]:
    """Longest-path layering; then nodes without inputs move right to sit just before their first consumer
    (a latent or a loader used late would otherwise be stranded in column 0 with a long link)."""
    layer: dict[str, int] = {}
    for node_id in order:
        layer[node_id] = max((layer[source] + 1 for source in graph.predecessors(node_id)), default=0)
    for node_id in order:
        if graph.in_degree(node_id) == 0 and graph.out_degree(node_id) > 0:
            layer[node_id] = min(layer[target] for target in graph.successors(node_id)) - 1
    return layer


def _node_size(layout: NodeLayout, socket_count: int) -> tuple[float, float]:
    visible = [w for w in layout.widgets if w.persisted]
    multiline = sum(1 for w in visible if w.dynamic_prompts)
    rows = max(socket_count, len(layout.outputs))
    height = (TITLE_HEIGHT + SLOT_HEIGHT * rows + WIDGET_HEIGHT * (len(visible) - multiline)
              + MULTILINE_HEIGHT * multiline)
    return (WIDE_NODE_WIDTH if multiline else NODE_WIDTH), float(max(height, 60))


def _place(nodes: dict[str, _UiNode], graph: nx.DiGraph, order: list[str]) -> dict[str, tuple[float, float]]:
    layer = _layers(graph, order)
    columns: dict[int, list[str]] = {}
    for node_id in order:
        columns.setdefault(layer[node_id], []).append(node_id)
    row_of: dict[str, float] = {}
    positions: dict[str, tuple[float, float]] = {}
    x = ORIGIN[0]
    for column in sorted(columns):
        members = columns[column]
        # Order a column by the mean row of each node's sources (barycentre), keeping input order for ties.
        members.sort(key=lambda n: (
            sum(row_of[s] for s in graph.predecessors(n)) / max(1, graph.in_degree(n)), order.index(n)))
        y = ORIGIN[1]
        for row, node_id in enumerate(members):
            row_of[node_id] = row
            positions[node_id] = (x, y)
            y += nodes[node_id].size[1] + ROW_GAP
        x += max(nodes[n].size[0] for n in members) + COLUMN_GAP
    return positions


def api_to_ui(prompt: dict[str, Any], catalogue: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Convert an API prompt to an editor workflow (version 0.4) with a left-to-right layout.

    Inputs the catalogue does not know, and literal values given for link-only sockets, have no place in
    the editor; they are left out and listed in `extra.conversion_warnings`.
    """
    _check_prompt(prompt, catalogue)
    prompt = {str(node_id): entry for node_id, entry in prompt.items()}
    ui_ids = _assign_ui_ids(prompt)
    warnings: list[str] = []
    graph = nx.DiGraph()
    graph.add_nodes_from(prompt)
    nodes: dict[str, _UiNode] = {}
    for node_id, entry in prompt.items():
        layout = node_layout(entry["class_type"], catalogue)
        nodes[node_id] = _UiNode(node_id, ui_ids[node_id], entry["class_type"], layout, entry)
        for name, value in (entry.get("inputs") or {}).items():
            if _is_link(value):
                source = str(value[0])
                if source not in prompt:
                    raise WorkflowFormatError(
                        f"API node {node_id!r} input {name!r} links to node {source!r}, which is not in the prompt")
                graph.add_edge(source, node_id)
    if not nx.is_directed_acyclic_graph(graph):
        cycle = nx.find_cycle(graph)
        raise WorkflowFormatError(f"API prompt has a cycle through nodes {[edge[0] for edge in cycle]}")
    position = {node_id: index for index, node_id in enumerate(prompt)}
    order = list(nx.lexicographical_topological_sort(graph, key=position.__getitem__))

    links: list[list[Any]] = []
    for node_id in order:
        node = nodes[node_id]
        inputs = node.entry.get("inputs") or {}
        layout = node.layout
        for socket in layout.sockets:
            value = inputs.get(socket.name)
            node.inputs.append({"name": socket.name, "type": socket.type, "link": None})
            if value is not None and not _is_link(value):
                warnings.append(f"node {node_id}: literal value for link-only input {socket.name!r} left out")
        for name in layout.widget_types:
            if _is_link(inputs.get(name)):
                node.inputs.append({"name": name, "type": layout.widget_types[name], "widget": {"name": name},
                                    "link": None})
        known = {s.name for s in layout.sockets} | set(layout.widget_types)
        for name in inputs:
            if name not in known:
                warnings.append(
                    f"node {node_id}: input {name!r} is not in the catalogue for {node.class_type}; left out")
        for slot, ui_input in enumerate(node.inputs):
            value = inputs.get(ui_input["name"])
            if not _is_link(value):
                continue
            source_node = nodes[str(value[0])]
            source_slot = int(value[1])
            if not 0 <= source_slot < len(source_node.layout.outputs):
                raise WorkflowFormatError(
                    f"API node {node_id!r} input {ui_input['name']!r} uses output {source_slot} of node "
                    f"{source_node.api_id!r} ({source_node.class_type}), which has "
                    f"{len(source_node.layout.outputs)} output(s)")
            link_id = len(links) + 1
            link_type = source_node.layout.outputs[source_slot].type
            links.append([link_id, source_node.ui_id, source_slot, node.ui_id, slot, link_type])
            ui_input["link"] = link_id
        for widget in layout.widgets:
            if not widget.persisted:
                continue
            if widget.kind == "control":
                node.widgets_values.append("fixed")
            elif widget.kind != "value":
                node.widgets_values.append(widget.default)
            else:
                value = inputs.get(widget.name, widget.default)
                node.widgets_values.append(widget.default if _is_link(value) else _unwrap(value))
        node.size = _node_size(layout, len(node.inputs))

    for node in nodes.values():
        node.outputs = [
            {"name": out.name, "type": out.type, "links": [], **({"shape": 6} if out.is_list else {})}
            for out in node.layout.outputs
        ]
    by_ui_id = {node.ui_id: node for node in nodes.values()}
    for link_id, source_id, source_slot, _, _, _ in links:
        by_ui_id[source_id].outputs[source_slot]["links"].append(link_id)

    positions = _place(nodes, graph, order)
    ui_nodes = [_serialise(nodes[node_id], positions[node_id], index) for index, node_id in enumerate(order)]
    digest = hashlib.sha256(json.dumps(prompt, sort_keys=True, default=str).encode()).hexdigest()
    workflow: dict[str, Any] = {
        "id": str(uuid.UUID(digest[:32])),
        "revision": 0,
        "last_node_id": max(ui_ids.values()),
        "last_link_id": len(links),
        "nodes": ui_nodes,
        "links": links,
        "groups": [],
        "config": {},
        "extra": {"ds": {"scale": 1, "offset": [0, 0]}},
        "version": 0.4,
    }
    if warnings:
        workflow["extra"]["conversion_warnings"] = warnings
    return workflow


def _serialise(node: _UiNode, pos: tuple[float, float], order: int) -> dict[str, Any]:
    meta = node.entry.get("_meta") or {}
    properties: dict[str, Any] = {"Node name for S&R": node.class_type}
    for key in ("cnr_id", "aux_id", "ver"):
        if isinstance(meta.get(key), str) and meta[key]:
            properties[key] = meta[key]
    serialised: dict[str, Any] = {
        "id": node.ui_id,
        "type": node.class_type,
        "pos": [pos[0], pos[1]],
        "size": [node.size[0], node.size[1]],
        "flags": {},
        "order": order,
        "mode": 0,
        "inputs": node.inputs,
        "outputs": node.outputs,
        "properties": properties,
        "widgets_values": node.widgets_values,
    }
    if isinstance(meta.get("title"), str):
        serialised["title"] = meta["title"]
    return serialised
