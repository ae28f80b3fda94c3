"""API-format graphs: parsing and validation into a typed Graph, with ComfyUI's error types and shapes.

Validation never mutates the submitted prompt and never recurses: structure goes through networkx (iterative
algorithms), so a 10,000-node chain validates as easily as a 10-node one, and a cycle is reported with its nodes.
"""

from __future__ import annotations

import math
import traceback
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import networkx as nx

from .node import Node
from .registry import NodeRegistry
from .types import BOOLEAN, COMBO, FLOAT, INT, STRING, InputSpec, types_compatible

COMBO_LIST_ABBREVIATE = 20


@dataclass(frozen=True)
class Link:
    source: str
    slot: int

    def as_json(self) -> list[Any]:
        return [self.source, self.slot]


@dataclass
class GraphNode:
    id: str
    class_type: str
    node_cls: type[Node]
    constants: dict[str, Any]
    links: dict[str, Link]
    title: str | None = None
    # For nodes added by expansion: the expanding node, and the id the client sees for progress and errors.
    parent: str | None = None
    display_id: str | None = None

    @property
    def display(self) -> str:
        return self.display_id or self.id

    def dependency_links(self) -> Iterable[tuple[str, Link]]:
        """Links the node waits on before it can start (lazy inputs wait only when asked for; raw links never)."""
        specs = self.node_cls.input_specs()
        for name, link in self.links.items():
            spec = specs.get(name)
            if spec is None or not (spec.lazy or spec.raw_link):
                yield name, link


@dataclass
class Graph:
    nodes: dict[str, GraphNode]
    outputs: list[str]
    prompt: dict[str, Any]  # the submitted API-format prompt, untouched


def make_error(error_type: str, message: str, details: str = "", **extra_info: Any) -> dict[str, Any]:
    return {"type": error_type, "message": message, "details": details, "extra_info": extra_info}


@dataclass
class ValidationResult:
    graph: Graph | None
    error: dict[str, Any] | None = None
    node_errors: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.graph is not None

    def as_response(self) -> dict[str, Any]:
        """ComfyUI's 400 body: {error, node_errors}."""
        return {"error": self.error, "node_errors": self.node_errors}


class GraphError(Exception):
    """A structural problem found outside validation (e.g. a cycle created by node expansion)."""


# Literal parsing --------------------------------------------------------------------------------------------

def parse_link(value: Any) -> Link | None:
    """A 2-element list [node_id, slot] is a link; anything else is not."""
    if isinstance(value, (list, tuple)) and len(value) == 2:
        source, slot = value
        if isinstance(source, (str, int)) and not isinstance(source, bool) and isinstance(slot, (int, float)) \
                and not isinstance(slot, bool) and float(slot).is_integer():
            return Link(str(source), int(slot))
    return None


def unwrap_literal(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"__value__"}:
        return value["__value__"]
    return value


class CoercionError(ValueError):
    pass


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def coerce_value(spec_type: str, value: Any) -> Any:
    """Convert a literal to the declared widget type. Unlike ComfyUI, "false" is False and 5.7 is not an INT."""
    if spec_type == INT:
        if isinstance(value, bool):
            raise CoercionError("a boolean is not an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            text = value.strip()
            try:
                return int(text)
            except ValueError:
                number = float(text)
                if number.is_integer():
                    return int(number)
        raise CoercionError(f"{value!r} is not an integer")
    if spec_type == FLOAT:
        if isinstance(value, bool):
            raise CoercionError("a boolean is not a number")
        if isinstance(value, (int, float)):
            number = float(value)
        elif isinstance(value, str):
            number = float(value.strip())
        else:
            raise CoercionError(f"{value!r} is not a number")
        if math.isnan(number):
            raise CoercionError("NaN is not allowed")
        return number
    if spec_type == STRING:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise CoercionError(f"{type(value).__name__} is not a string")
    if spec_type == BOOLEAN:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise CoercionError(f"{value!r} is not a boolean")
    if spec_type == COMBO:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise CoercionError(f"{type(value).__name__} is not a choice")
    return value  # socket types and unions: passed through for the node's own validator


class InputChecker:
    """Checks one node's declared inputs. Combo choices are resolved once per (class, input) per validation."""

    def __init__(self, env: Any):
        self.env = env
        self._choices: dict[tuple[type, str], list[str]] = {}

    def choices(self, node_cls: type[Node], name: str, spec: InputSpec) -> list[str]:
        key = (node_cls, name)
        if key not in self._choices:
            self._choices[key] = spec.resolve_choices(self.env)
        return self._choices[key]

    def check_constant(self, node_cls: type[Node], name: str, spec: InputSpec, raw: Any,
                       errors: list[dict[str, Any]]) -> Any:
        config = [spec.type, {}]
        try:
            value = coerce_value(spec.type, raw)
        except (CoercionError, ValueError, TypeError) as exc:
            errors.append(make_error(
                "invalid_input_type", f"Failed to convert an input value to a {spec.type} value",
                f"{name}, {raw!r}, {exc}", input_name=name, input_config=config, received_value=raw,
                exception_message=str(exc)))
            return None
        if not spec.check_value:
            return value
        if spec.type in (INT, FLOAT):
            if spec.min is not None and value < spec.min:
                errors.append(make_error("value_smaller_than_min", f"Value {value} smaller than min of {spec.min}",
                                         name, input_name=name, input_config=config, received_value=value))
            if spec.max is not None and value > spec.max:
                errors.append(make_error("value_bigger_than_max", f"Value {value} bigger than max of {spec.max}",
                                         name, input_name=name, input_config=config, received_value=value))
        elif spec.type == COMBO:
            choices = self.choices(node_cls, name, spec)
            if value not in choices:
                listed = f"(list of length {len(choices)})" if len(choices) > COMBO_LIST_ABBREVIATE else repr(choices)
                errors.append(make_error(
                    "value_not_in_list", "Value not in list", f"{name}: '{value}' not in {listed}",
                    input_name=name, input_config=None if len(choices) > COMBO_LIST_ABBREVIATE else [choices, {}],
                    received_value=value))
        return value


def _has_custom_validator(node_cls: type[Node]) -> bool:
    base_validator = vars(Node)["validate_inputs"].__func__  # the function inside Node's classmethod
    return getattr(node_cls.validate_inputs, "__func__", None) is not base_validator


def build_node(node_id: str, body: Any, registry: NodeRegistry, checker: InputChecker,
               ) -> tuple[GraphNode | None, list[dict[str, Any]], dict[str, Any] | None]:
    """Parse one prompt entry. Returns (node, per-node errors, prompt-level error)."""
    title = None
    if isinstance(body, dict) and isinstance(body.get("_meta"), dict):
        title = body["_meta"].get("title")
    class_type = body.get("class_type") if isinstance(body, dict) else None
    if not isinstance(class_type, str) or not class_type:
        return None, [], make_error(
            "missing_node_type",
            f"Node '{title or f'ID #{node_id}'}' has no class_type. The workflow may be corrupted or a custom node "
            "is missing.", f"Node ID '#{node_id}'", node_id=node_id, class_type=None, node_title=title)
    node_cls = registry.get(class_type)
    if node_cls is None:
        return None, [], make_error(
            "missing_node_type", f"Node '{title or class_type}' not found. The custom node may not be installed.",
            f"Node ID '#{node_id}'", node_id=node_id, class_type=class_type, node_title=title)
    inputs = body.get("inputs", {})
    errors: list[dict[str, Any]] = []
    if not isinstance(inputs, dict):
        errors.append(make_error("invalid_prompt", "Node inputs must be an object", f"Node ID '#{node_id}'"))
        inputs = {}
    specs = node_cls.input_specs()
    constants: dict[str, Any] = {}
    links: dict[str, Link] = {}
    for name, raw in inputs.items():
        spec = specs.get(name)
        link = parse_link(raw)
        if link is not None:
            links[name] = link  # undeclared links pass through to the node (variadic inputs)
        elif spec is None:
            continue  # undeclared constants are dropped, as ComfyUI does
        elif isinstance(raw, (list, tuple)):
            errors.append(make_error(
                "bad_linked_input", "Bad linked input, must be a length-2 list of [node_id, slot_index]", name,
                input_name=name, input_config=[spec.type, {}], received_value=raw))
        else:
            value = checker.check_constant(node_cls, name, spec, unwrap_literal(raw), errors)
            if value is not None or raw is None:
                constants[name] = value
    for name, spec in specs.items():
        if not spec.optional and name not in constants and name not in links \
                and not any(e["extra_info"].get("input_name") == name for e in errors):
            errors.append(make_error("required_input_missing", "Required input is missing", name, input_name=name))
    return GraphNode(node_id, class_type, node_cls, constants, links, title), errors, None


def check_links(node: GraphNode, nodes: dict[str, GraphNode], errors: list[dict[str, Any]]) -> dict[str, str]:
    """Link targets exist, slots are in range, types match. Returns {input: received type}."""
    specs = node.node_cls.input_specs()
    received: dict[str, str] = {}
    for name, link in node.links.items():
        source = nodes.get(link.source)
        spec = specs.get(name)
        config = [spec.type, {}] if spec else None
        if source is None:
            errors.append(make_error("bad_linked_input", "Linked node does not exist",
                                     f"{name}: node '{link.source}' is not in the graph", input_name=name,
                                     input_config=config, received_value=link.as_json()))
            continue
        outputs = source.node_cls.outputs
        if not 0 <= link.slot < len(outputs):
            errors.append(make_error("bad_linked_input", "Linked output slot does not exist",
                                     f"{name}: {source.class_type} has {len(outputs)} outputs, not slot {link.slot}",
                                     input_name=name, input_config=config, received_value=link.as_json()))
            continue
        received_type = outputs[link.slot].type
        received[name] = received_type
        if spec is not None and not spec.raw_link and not node.node_cls.checks_input_types \
                and not types_compatible(received_type, spec.type):
            errors.append(make_error(
                "return_type_mismatch", "Return type mismatch between linked nodes",
                f"{name}, received_type({received_type}) mismatch input_type({spec.type})", input_name=name,
                input_config=config, received_type=received_type, linked_node=link.as_json()))
    return received


def run_custom_validator(node: GraphNode, env: Any, received: dict[str, str], errors: list[dict[str, Any]]) -> None:
    if not _has_custom_validator(node.node_cls):
        return
    try:
        verdict = node.node_cls.validate_inputs(env, dict(node.constants), received)
    except Exception as exc:
        errors.append(make_error("exception_during_validation", "Exception when validating node", str(exc),
                                 exception_type=type(exc).__name__, traceback=traceback.format_exc().splitlines()))
        return
    if isinstance(verdict, dict):  # {input name: message}: errors the editor can show on those inputs
        for name, message in verdict.items():
            errors.append(make_error("custom_validation_failed", "Custom validation failed for node",
                                     f"{name} - {message}", input_name=name))
    elif verdict is not True:
        details = "" if verdict in (False, None) else str(verdict)
        errors.append(make_error("custom_validation_failed", "Custom validation failed for node", details))


def dependency_graph(nodes: dict[str, GraphNode], members: Iterable[str] | None = None) -> nx.DiGraph:
    members = list(members if members is not None else nodes)
    dag = nx.DiGraph()
    dag.add_nodes_from(members)
    dag.add_edges_from((link.source, node_id) for node_id in members for link in nodes[node_id].links.values()
                       if link.source in nodes)
    return dag


def _reachable(starts: Iterable[str], neighbours: Callable[[str], Iterable[str]]) -> set[str]:
    """Breadth-first closure (iterative: graphs may be thousands of nodes deep)."""
    seen = set(starts)
    queue = deque(seen)
    while queue:
        for other in neighbours(queue.popleft()):
            if other not in seen:
                seen.add(other)
                queue.append(other)
    return seen


def upstream_of(dag: nx.DiGraph, starts: Iterable[str]) -> set[str]:
    return _reachable(starts, dag.predecessors)


def downstream_of(dag: nx.DiGraph, starts: Iterable[str]) -> set[str]:
    return _reachable(starts, dag.successors)


def find_cycles(dag: nx.DiGraph) -> list[list[str]]:
    """One representative cycle (as a node path) per strongly connected component that has one."""
    if nx.is_directed_acyclic_graph(dag):
        return []
    cycles = []
    for component in nx.strongly_connected_components(dag):
        if len(component) == 1:
            (only,) = component
            if not dag.has_edge(only, only):
                continue
        sub = dag.subgraph(component)
        edges = nx.find_cycle(sub)
        cycles.append([edge[0] for edge in edges])
    return cycles


def validate_prompt(prompt: Any, registry: NodeRegistry, env: Any = None,
                    targets: Iterable[str] | None = None) -> ValidationResult:
    """Validate an API-format prompt into a Graph (or report why not). `targets` = partial_execution_targets."""
    if not isinstance(prompt, dict):
        return ValidationResult(None, make_error("invalid_prompt", "The prompt must be an object of nodes",
                                                 f"got {type(prompt).__name__}"))
    checker = InputChecker(env)
    nodes: dict[str, GraphNode] = {}
    errors_by_node: dict[str, list[dict[str, Any]]] = {}
    for raw_id, body in prompt.items():
        node_id = str(raw_id)
        node, errors, fatal = build_node(node_id, body, registry, checker)
        if node is None:  # build_node gives no node exactly when it reports a prompt-level error
            return ValidationResult(None, fatal)
        nodes[node_id] = node
        if errors:
            errors_by_node[node_id] = errors

    outputs = [node_id for node_id, node in nodes.items() if node.node_cls.output_node]
    if targets is not None:
        wanted = {str(t) for t in targets}
        outputs = [node_id for node_id in outputs if node_id in wanted]
    if not outputs:
        return ValidationResult(None, make_error("prompt_no_outputs", "Prompt has no outputs"))

    full_dag = dependency_graph(nodes)
    needed = upstream_of(full_dag, outputs)
    received_types: dict[str, dict[str, str]] = {}
    for node_id in needed:
        errors = errors_by_node.setdefault(node_id, [])
        received_types[node_id] = check_links(nodes[node_id], nodes, errors)
    for node_id in needed:
        if not errors_by_node[node_id]:
            run_custom_validator(nodes[node_id], env, received_types[node_id], errors_by_node[node_id])

    # `needed` is closed upstream, so its own graph has every edge that matters (and no slow subgraph views).
    dag = full_dag if len(needed) == len(nodes) else dependency_graph(nodes, needed)
    for cycle in find_cycles(dag):
        path = " -> ".join(f"#{n} {nodes[n].class_type}" for n in cycle + cycle[:1])
        for node_id in cycle:
            errors_by_node[node_id].append(make_error(
                "dependency_cycle", "Dependency cycle detected", f"the graph loops: {path}", cycle=list(cycle)))

    failed = {node_id for node_id in needed if errors_by_node.get(node_id)}
    invalid = downstream_of(dag, failed)
    valid_outputs = [o for o in outputs if o not in invalid]
    node_errors: dict[str, dict[str, Any]] = {}
    for output in outputs:
        if output not in invalid:
            continue
        for culprit in upstream_of(dag, [output]) & failed:
            entry = node_errors.setdefault(culprit, {"errors": errors_by_node[culprit], "dependent_outputs": [],
                                                     "class_type": nodes[culprit].class_type})
            entry["dependent_outputs"].append(output)
    if not valid_outputs:
        details = "\n".join(f"{e['message']}: {e['details']}" for o in outputs for e in errors_by_node.get(o, []))
        return ValidationResult(None, make_error("prompt_outputs_failed_validation",
                                                 "Prompt outputs failed validation", details), node_errors)
    return ValidationResult(Graph(nodes, valid_outputs, prompt), None, node_errors)
