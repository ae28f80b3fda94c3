"""UI (LiteGraph editor) workflow -> API prompt, the way the ComfyUI frontend's "Export (API)" does it.

The editor's rules, restated: subgraph instances are expanded into their inner nodes (execution ids
"outer:inner"); every input link is followed back through Reroutes, bypassed nodes (first input of a
matching type), subgraph boundaries and promoted widgets until it reaches a real node's output or a widget
value; muted nodes produce nothing, so inputs linked to them disappear; PrimitiveNodes push their value into
the widgets they feed; notes are dropped; widget values are read positionally against the widget list the
catalogue implies (companion widgets such as control_after_generate take a position but never reach the
prompt); dynamic-prompt text widgets get their `{a|b}` choices made and comments stripped, save nodes'
filename_prefix its `%date:...%` / `%Node.widget%` patterns expanded. Link resolution is a loop over
explicit states, never recursion.

Where the editor has quirks, they are reproduced because they decide the prompt: a muted node's consumers
stay in the prompt without that input; nested subgraph instances are expanded even when muted or bypassed
(only top-level instances are gated by their mode); stale widget inputs are dropped by a loop that skips
the slot after each removal. tools/frontend_export.py runs the real frontend to check all this.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import networkx as nx

from latentloom.engine.workflow.catalogue import (
    DECORATIVE_TYPES,
    GET_NODE_TYPE,
    NOTE_TYPES,
    PRIMITIVE_NODE_TYPE,
    REROUTE_TYPE,
    SET_NODE_TYPE,
    VIRTUAL_TYPES,
    NodeLayout,
    WorkflowFormatError,
    node_layout,
    ui_link_types_compatible,
)
from latentloom.engine.workflow.text import MISSING, SAVE_NODE_TYPES, apply_text_replacements, process_dynamic_prompt
from latentloom.engine.workflow.ui_graph import SUBGRAPH_INPUT_NODE, Link, Placed, Scope, parse_scopes

MODE_MUTED = 2  # LiteGraph "NEVER"
MODE_BYPASS = 4


class MissingNodeTypesError(WorkflowFormatError):
    """The workflow uses node types the catalogue does not have."""

    def __init__(self, missing: list[str]):
        self.missing = sorted(set(missing))
        hint = ""
        if any(name.startswith(("workflow>", "workflow/")) for name in self.missing):
            hint = " (types named 'workflow>...' are legacy group nodes: open and re-save the file in the editor)"
        super().__init__(
            f"workflow uses {len(self.missing)} node type(s) that are not installed: " + ", ".join(self.missing) + hint
        )


@dataclass(frozen=True)
class WidgetValue:
    value: Any


@dataclass
class _Workflow:
    scopes: dict[str, Scope]
    subgraph_ids: set[str]
    catalogue: dict[str, dict[str, Any]]
    placed: dict[str, Placed] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)
    layouts: dict[str, NodeLayout] = field(default_factory=dict)
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)  # PrimitiveNode values by exec id
    live_inputs: dict[int, list[dict[str, Any]]] = field(default_factory=dict)

    def node(self, placed: Placed) -> dict[str, Any]:
        return self.scopes[placed.scope_key].nodes[placed.node_id]

    def layout(self, class_type: str) -> NodeLayout:
        if class_type not in self.layouts:
            self.layouts[class_type] = node_layout(class_type, self.catalogue)
        return self.layouts[class_type]

    def is_instance(self, node: dict[str, Any]) -> bool:
        return str(node.get("type")) in self.subgraph_ids

    def has_widget(self, node: dict[str, Any], name: str) -> bool:
        node_type = str(node.get("type"))
        return node_type in self.catalogue and any(w.name == name for w in self.layout(node_type).widgets)

    def inputs(self, node: dict[str, Any]) -> list[dict[str, Any]]:
        """A node's input slots as the editor holds them after loading.

        For a catalogue node type the editor first creates the slots the definition implies (sockets, then
        one per widget), takes each one's link from the saved input of the same name, then appends saved
        inputs it did not create. Appended widget inputs naming no widget of the node are then removed, by a
        loop that deletes from the list it walks, so the slot right after a removed one is never looked at
        and survives; that quirk decides which links reach the prompt, so it is kept.
        """
        key = id(node)
        if key in self.live_inputs:
            return self.live_inputs[key]
        saved = list(node.get("inputs") or [])
        node_type = str(node.get("type"))
        if node_type not in self.catalogue:
            self.live_inputs[key] = saved
            return saved
        layout = self.layout(node_type)
        saved_by_name: dict[str, dict[str, Any]] = {}
        for slot in saved:
            saved_by_name.setdefault(str(slot.get("name")), slot)
        created: list[dict[str, Any]] = [{"name": socket.name, "type": socket.type} for socket in layout.sockets]
        created += [
            {"name": w.name, "type": layout.widget_types.get(w.name, "IMAGEUPLOAD"), "widget": {"name": w.name}}
            for w in layout.widgets if w.kind in ("value", "upload")
        ]
        for slot in created:
            slot["link"] = saved_by_name.get(slot["name"], {}).get("link")
        created_names = {slot["name"] for slot in created}
        extra = [slot for slot in saved if str(slot.get("name")) not in created_names]
        index = 0
        while index < len(extra):
            widget = extra[index].get("widget")
            if isinstance(widget, dict) and not self.has_widget(node, str(widget.get("name"))):
                del extra[index]
            index += 1
        self.live_inputs[key] = created + extra
        return self.live_inputs[key]


def _expand(flow: _Workflow) -> None:
    """Place every node; instances that are muted or bypassed are not opened."""
    stack: list[tuple[tuple[str, ...], str, tuple[str, ...]]] = [((), "", ())]
    while stack:
        path, scope_key, open_defs = stack.pop()
        scope = flow.scopes[scope_key]
        nested = []
        for node_id, node in scope.nodes.items():
            placed = Placed(path, node_id, scope_key)
            flow.placed[placed.exec_id] = placed
            flow.order.append(placed.exec_id)
            # Only top-level instances are gated by their mode; the editor opens nested ones regardless.
            if flow.is_instance(node) and (path or node.get("mode") not in (MODE_MUTED, MODE_BYPASS)):
                subgraph_id = str(node["type"])
                if subgraph_id in open_defs:
                    raise WorkflowFormatError(f"subgraph {subgraph_id} contains itself (via node {placed.exec_id})")
                nested.append(((*path, node_id), subgraph_id, (*open_defs, subgraph_id)))
        stack += reversed(nested)


def _check_types(flow: _Workflow) -> None:
    missing = []
    for exec_id in flow.order:
        node = flow.node(flow.placed[exec_id])
        node_type = str(node.get("type"))
        if node_type in flow.catalogue or node_type in VIRTUAL_TYPES or flow.is_instance(node):
            continue
        if node.get("mode") == MODE_MUTED or node_type in DECORATIVE_TYPES:
            continue
        if not node.get("inputs") and not node.get("outputs"):
            continue  # slot-less: purely visual, nothing can flow through it
        if node.get("mode") == MODE_BYPASS:
            continue  # rewired by its slot types, never executed
        missing.append(node_type)
    if missing:
        raise MissingNodeTypesError(missing)


def _aligned_widget_values(node: dict[str, Any], layout: NodeLayout) -> dict[str, Any]:
    """Widget name -> value, reading widgets_values against the catalogue's widget list."""
    raw = node.get("widgets_values")
    values = {w.name: w.default for w in layout.widgets}
    if isinstance(raw, dict):
        values.update({name: value for name, value in raw.items() if name in values})
    elif isinstance(raw, list):
        for widget, value in zip(layout.persisted_widgets, raw, strict=False):
            values[widget.name] = value
    return values


def _input_link(flow: _Workflow, placed: Placed, slot: int) -> str | None:
    """Link id on input `slot` of a node; a subgraph instance's inputs follow its definition's inputs."""
    node = flow.node(placed)
    if flow.is_instance(node):
        definition = flow.scopes[str(node["type"])].definition or {}
        def_inputs = definition.get("inputs") or []
        if slot >= len(def_inputs):
            return None
        name = def_inputs[slot].get("name")
        for candidate in node.get("inputs") or []:
            if candidate.get("name") == name:
                return None if candidate.get("link") is None else str(candidate["link"])
        return None
    inputs = flow.inputs(node)
    if slot >= len(inputs):
        raise WorkflowFormatError(f"node {placed.exec_id}: no input slot {slot}")
    link = inputs[slot].get("link")
    return None if link is None else str(link)


def _slot_types(flow: _Workflow, placed: Placed) -> tuple[list[Any], list[Any]]:
    node = flow.node(placed)
    if flow.is_instance(node):
        definition = flow.scopes[str(node["type"])].definition or {}
        return ([i.get("type") for i in definition.get("inputs") or []],
                [o.get("type") for o in definition.get("outputs") or []])
    return [i.get("type") for i in flow.inputs(node)], [o.get("type") for o in node.get("outputs") or []]


def _bypass_input_slot(flow: _Workflow, placed: Placed, slot: int, wanted: Any) -> int:
    """Which input a bypassed node passes through to output `slot` (the frontend's matching rule)."""
    input_types, output_types = _slot_types(flow, placed)
    if not input_types:
        return -1
    if wanted in ("*", "", None):
        return slot if len(input_types) > slot else 0
    output_type = output_types[slot] if slot < len(output_types) else None
    if slot < len(input_types) and ui_link_types_compatible(input_types[slot], output_type) \
            and ui_link_types_compatible(input_types[slot], wanted):
        return slot
    if wanted in input_types:
        return input_types.index(wanted)
    for index, input_type in enumerate(input_types):
        if ui_link_types_compatible(input_type, output_type) and ui_link_types_compatible(input_type, wanted):
            return index
    return -1


def _promoted_value(flow: _Workflow, instance: Placed, slot: int) -> WidgetValue | None:
    """Value of the widget a subgraph instance shows for its (unlinked) input `slot`, if it shows one."""
    current, current_slot = instance, slot
    while True:
        node = flow.node(current)
        scope = flow.scopes[str(node["type"])]
        def_inputs = (scope.definition or {}).get("inputs") or []
        target = _promotion_target(flow, scope, def_inputs[current_slot]) if current_slot < len(def_inputs) else None
        if target is None:
            return None
        promoted_slots = [i for i, d in enumerate(def_inputs) if _promotion_target(flow, scope, d) is not None]
        stored = node.get("widgets_values")
        position = promoted_slots.index(current_slot)
        if isinstance(stored, list) and position < len(stored) and stored[position] is not None:
            return WidgetValue(stored[position])
        inner_id, widget_name, inner_slot = target
        inner = Placed((*current.path, current.node_id), inner_id, scope.key)
        inner_node = flow.node(inner)
        if flow.is_instance(inner_node):  # nested promotion: ask the inner instance
            current, current_slot = inner, inner_slot
            continue
        if inner_node.get("type") == PRIMITIVE_NODE_TYPE or inner_node.get("type") not in flow.catalogue:
            return None
        values = _aligned_widget_values(inner_node, flow.layout(str(inner_node["type"])))
        return WidgetValue(values.get(widget_name))


def _promotion_target(flow: _Workflow, scope: Scope, def_input: dict[str, Any]) -> tuple[str, str, int] | None:
    """(inner node id, widget or input name, inner slot) of the first inner widget a subgraph input drives."""
    for link_id in def_input.get("linkIds") or []:
        link = scope.link(link_id)
        if link is None or link.target_id not in scope.nodes:
            continue
        inner = scope.nodes[link.target_id]
        target_input = _target_input(flow, scope, inner, link)
        if flow.is_instance(inner):  # nested promotion through an inner instance's own input
            inner_scope = flow.scopes[str(inner["type"])]
            inner_inputs = (inner_scope.definition or {}).get("inputs") or []
            for index, candidate in enumerate(inner_inputs):
                if candidate.get("name") == target_input.get("name") and _drives_widget(flow, inner_scope, candidate):
                    return link.target_id, str(candidate.get("name")), index
            continue
        widget = target_input.get("widget")
        if isinstance(widget, dict) and flow.has_widget(inner, str(widget.get("name"))):
            return link.target_id, str(widget["name"]), link.target_slot
    return None


def _drives_widget(flow: _Workflow, scope: Scope, def_input: dict[str, Any]) -> bool:
    """Whether a subgraph input reaches a widget input, descending through nested instances (no recursion)."""
    stack = [(scope, def_input)]
    seen: set[tuple[str, str]] = set()
    while stack:
        current_scope, current_input = stack.pop()
        key = (current_scope.key, str(current_input.get("name")))
        if key in seen:
            continue
        seen.add(key)
        for link_id in current_input.get("linkIds") or []:
            link = current_scope.link(link_id)
            if link is None or link.target_id not in current_scope.nodes:
                continue
            inner = current_scope.nodes[link.target_id]
            target_input = _target_input(flow, current_scope, inner, link)
            if flow.is_instance(inner):
                inner_scope = flow.scopes[str(inner["type"])]
                for candidate in (inner_scope.definition or {}).get("inputs") or []:
                    if candidate.get("name") == target_input.get("name"):
                        stack.append((inner_scope, candidate))
            elif isinstance(target_input.get("widget"), dict) and flow.has_widget(
                inner, str(target_input["widget"].get("name"))
            ):
                return True
    return False


def _target_input(flow: _Workflow, scope: Scope, node: dict[str, Any], link: Link) -> dict[str, Any]:
    if flow.is_instance(node):  # an instance's slots are its definition's inputs, matched to links by name
        def_inputs = (flow.scopes[str(node["type"])].definition or {}).get("inputs") or []
        for candidate in node.get("inputs") or []:
            if candidate.get("link") is not None and scope.same_link(candidate["link"], link):
                return next((d for d in def_inputs if d.get("name") == candidate.get("name")), {})
        return def_inputs[link.target_slot] if link.target_slot < len(def_inputs) else {}
    for candidate in flow.inputs(node):
        if candidate.get("link") is not None and scope.same_link(candidate["link"], link):
            return candidate
    return {}


def _resolve_input(flow: _Workflow, placed: Placed, slot: int) -> tuple[str, int] | WidgetValue | None:
    """Follow input `slot` of `placed` to the real output (exec id, slot) or a promoted widget value."""
    node = flow.node(placed)
    first_link = _input_link(flow, placed, slot)
    if first_link is None:
        return None
    wanted_type = flow.inputs(node)[slot].get("type") if not flow.is_instance(node) else None
    state: tuple[Any, ...] = ("link", placed, first_link)
    visited: set[tuple[Any, ...]] = set()
    while True:
        key = (state[0], state[1].exec_id, state[2])
        if key in visited:
            raise WorkflowFormatError(f"node {placed.exec_id}: circular link chain while resolving input {slot}")
        visited.add(key)
        if state[0] == "link":
            _, target, link_id = state
            scope = flow.scopes[target.scope_key]
            link = scope.link(link_id)
            if link is None:
                raise WorkflowFormatError(f"node {target.exec_id}: input refers to missing link {link_id}")
            if link.origin_id == SUBGRAPH_INPUT_NODE and target.path:
                instance = flow.placed[target.parent_id]
                outer = _input_link(flow, instance, link.origin_slot)
                if outer is None:
                    return _promoted_value(flow, instance, link.origin_slot)
                state = ("link", instance, outer)
                continue
            if link.origin_id not in scope.nodes:
                raise WorkflowFormatError(f"link {link_id} starts at node {link.origin_id}, which does not exist")
            state = ("out", Placed(target.path, link.origin_id, target.scope_key), link.origin_slot)
            continue
        _, source, out_slot = state
        source_node = flow.node(source)
        mode = source_node.get("mode")
        if mode == MODE_MUTED:
            return None
        if mode == MODE_BYPASS:
            through = _bypass_input_slot(flow, source, out_slot, wanted_type)
            link_id = _input_link(flow, source, through) if through >= 0 else None
            if link_id is None:
                return None
            state = ("link", source, link_id)
            continue
        if flow.is_instance(source_node):
            inner_scope = flow.scopes[str(source_node["type"])]
            outputs = (inner_scope.definition or {}).get("outputs") or []
            link_ids = outputs[out_slot].get("linkIds") if out_slot < len(outputs) else None
            inner_link = inner_scope.link(link_ids[0]) if link_ids else None
            if inner_link is None:
                return None
            inner_path = (*source.path, source.node_id)
            if inner_link.origin_id == SUBGRAPH_INPUT_NODE:  # input wired straight to output
                outer = _input_link(flow, source, inner_link.origin_slot)
                if outer is None:
                    return _promoted_value(flow, source, inner_link.origin_slot)
                state = ("link", source, outer)
                continue
            state = ("out", Placed(inner_path, inner_link.origin_id, inner_scope.key), inner_link.origin_slot)
            continue
        node_type = source_node.get("type")
        if node_type == GET_NODE_TYPE:
            setter = _find_setter(flow, source)
            if setter is None:
                return None
            source, node_type, source_node = setter, SET_NODE_TYPE, flow.node(setter)
        if node_type in (REROUTE_TYPE, SET_NODE_TYPE):
            link_id = _input_link(flow, source, 0) if source_node.get("inputs") else None
            if link_id is None:
                return None
            state = ("link", source, link_id)
            continue
        if node_type in VIRTUAL_TYPES:
            return None
        return source.exec_id, out_slot


def _find_setter(flow: _Workflow, getter: Placed) -> Placed | None:
    """The SetNode a GetNode reads from: same name, in the getter's own graph level first, then the root."""
    name = (flow.node(getter).get("widgets_values") or [None])[0]
    for scope_key, path in ((getter.scope_key, getter.path), ("", ())):
        for node_id, node in flow.scopes[scope_key].nodes.items():
            if node.get("type") == SET_NODE_TYPE and (node.get("widgets_values") or [None])[0] == name:
                return Placed(path, node_id, scope_key)
    return None


def _widget_lookup(flow: _Workflow) -> Callable[[str, str], Any]:
    """The editor's search-and-replace source: a node by its "Node name for S&R" property, else its title."""

    def widget_value(node_name: str, widget_name: str) -> Any:
        nodes = [(scope.key, node_id, node) for scope in flow.scopes.values() for node_id, node in scope.nodes.items()]
        matches = [n for n in nodes if (n[2].get("properties") or {}).get("Node name for S&R") == node_name]
        if not matches:
            matches = [n for n in nodes if _title(flow, n[2]) == node_name]
        if not matches:
            return MISSING
        scope_key, node_id, node = matches[0]
        node_type = str(node.get("type"))
        if node_type not in flow.catalogue or not flow.has_widget(node, widget_name):
            return MISSING
        values = _aligned_widget_values(node, flow.layout(node_type))
        if not scope_key:
            values.update(flow.overrides.get(node_id, {}))
        return values.get(widget_name)

    return widget_value


def _title(flow: _Workflow, node: dict[str, Any]) -> str:
    if node.get("title"):
        return str(node["title"])
    node_type = str(node.get("type"))
    return flow.layout(node_type).display_name if node_type in flow.catalogue else node_type


def _apply_primitive_nodes(flow: _Workflow, now: datetime) -> None:
    """PrimitiveNodes write their value into each widget their output feeds (frontend applyToGraph)."""
    for exec_id in flow.order:
        placed = flow.placed[exec_id]
        node = flow.node(placed)
        if node.get("type") != PRIMITIVE_NODE_TYPE:
            continue
        values = node.get("widgets_values")
        if not isinstance(values, list) or not values:
            continue
        value = values[0]
        if value and isinstance(value, str) and (node.get("properties") or {}).get("Run widget replace on values"):
            value = apply_text_replacements(value, _widget_lookup(flow), now)
        scope = flow.scopes[placed.scope_key]
        for link in scope.links.values():
            if link.origin_id != placed.node_id or link.origin_slot != 0 or link.target_id not in scope.nodes:
                continue
            widget = _target_input(flow, scope, scope.nodes[link.target_id], link).get("widget")
            if isinstance(widget, dict) and widget.get("name"):
                target_exec = ":".join((*placed.path, link.target_id))
                flow.overrides.setdefault(target_exec, {})[str(widget["name"])] = value


def _wrap(value: Any) -> Any:
    return {"__value__": value} if isinstance(value, list) else value


def _meta(node: dict[str, Any], layout: NodeLayout) -> dict[str, Any]:
    title = node.get("title")
    meta: dict[str, Any] = {"title": title if title else layout.display_name}  # the editor treats "" as unset
    properties = node.get("properties") or {}
    for key in ("cnr_id", "aux_id", "ver"):
        if isinstance(properties.get(key), str) and properties[key]:
            meta[key] = properties[key]
    return meta


def ui_to_api(
    workflow: dict[str, Any], catalogue: dict[str, dict[str, Any]], rng: random.Random | None = None,
    now: datetime | None = None,
) -> dict[str, dict[str, Any]]:
    """Convert an editor (LiteGraph) workflow to an API prompt {id: {inputs, class_type, _meta}}.

    `rng` drives the `{a|b}` choices of dynamic-prompt text widgets (a fresh generator when omitted), `now`
    the `%date:...%` patterns of save nodes' filename_prefix (local time when omitted).
    Raises MissingNodeTypesError (a WorkflowFormatError) naming every node type the catalogue lacks.
    """
    if not isinstance(workflow, dict):
        raise WorkflowFormatError("a UI workflow must be a JSON object")
    try:
        return _convert(workflow, catalogue, rng, now)
    except WorkflowFormatError:
        raise
    except (AttributeError, TypeError, KeyError, IndexError, ValueError) as exc:
        # check_shape catches the common damage; anything it misses is still a format error, not a crash.
        raise WorkflowFormatError(f"malformed UI workflow ({type(exc).__name__}: {exc})") from exc


def _convert(
    workflow: dict[str, Any], catalogue: dict[str, dict[str, Any]], rng: random.Random | None, now: datetime | None
) -> dict[str, dict[str, Any]]:
    scopes, subgraph_ids = parse_scopes(workflow)
    flow = _Workflow(scopes, subgraph_ids, catalogue)
    _expand(flow)
    _check_types(flow)
    now = now or datetime.now()
    _apply_primitive_nodes(flow, now)
    rng = rng or random.Random()
    lookup = _widget_lookup(flow)

    prompt: dict[str, dict[str, Any]] = {}
    for exec_id in flow.order:
        placed = flow.placed[exec_id]
        node = flow.node(placed)
        node_type = str(node.get("type"))
        if node.get("mode") in (MODE_MUTED, MODE_BYPASS) or node_type not in catalogue or flow.is_instance(node):
            continue
        if node_type in NOTE_TYPES or node_type in VIRTUAL_TYPES:
            continue
        layout = flow.layout(node_type)
        values = _aligned_widget_values(node, layout)
        values.update(flow.overrides.get(exec_id, {}))
        inputs: dict[str, Any] = {}
        for widget in layout.widgets:
            if not widget.in_prompt:
                continue
            value = values.get(widget.name)
            if widget.dynamic_prompts and isinstance(value, str):
                value = process_dynamic_prompt(value, rng)
            elif widget.name == "filename_prefix" and node_type in SAVE_NODE_TYPES and isinstance(value, str):
                value = apply_text_replacements(value, lookup, now)
            inputs[widget.name] = _wrap(value)
        for slot, node_input in enumerate(flow.inputs(node)):
            resolved = _resolve_input(flow, placed, slot)
            if resolved is None:
                continue
            name = str(node_input.get("name"))
            if isinstance(resolved, WidgetValue):
                inputs[name] = _wrap(resolved.value)
            else:
                inputs[name] = [resolved[0], resolved[1]]
        prompt[exec_id] = {"inputs": inputs, "class_type": node_type, "_meta": _meta(node, layout)}

    for entry in prompt.values():  # links to nodes that did not make it into the prompt are dropped
        for name in [n for n, v in entry["inputs"].items() if _is_link(v) and v[0] not in prompt]:
            del entry["inputs"][name]
    return _execution_ordered(prompt)


def _is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def _execution_ordered(prompt: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    graph = nx.DiGraph()
    position = {node_id: index for index, node_id in enumerate(prompt)}
    graph.add_nodes_from(prompt)
    for node_id, entry in prompt.items():
        for value in entry["inputs"].values():
            if _is_link(value):
                graph.add_edge(value[0], node_id)
    try:
        order = list(nx.lexicographical_topological_sort(graph, key=position.__getitem__))
    except nx.NetworkXUnfeasible:
        order = list(prompt)
    return {node_id: prompt[node_id] for node_id in order}
