"""The editor's workflow file as it stands after loading: graph levels, links, subgraph definitions.

Loading normalises what the file says the way the ComfyUI editor does, because those normalisations decide
which ids and links the exported prompt has: duplicate links to one input are reduced to one, node ids that
clash across subgraph definitions are renumbered, definitions nested inside definitions are hoisted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from latentloom.engine.workflow.catalogue import WorkflowFormatError

SUBGRAPH_INPUT_NODE = "-10"  # the pseudo-node that a subgraph's inputs leave from
SUBGRAPH_OUTPUT_NODE = "-20"


@dataclass(frozen=True)
class Link:
    id: str
    origin_id: str
    origin_slot: int
    target_id: str
    target_slot: int
    type: Any


@dataclass
class Scope:
    """One graph level: the root graph or a subgraph definition."""

    key: str
    nodes: dict[str, dict[str, Any]]
    links: dict[str, Link]
    definition: dict[str, Any] | None = None
    aliases: dict[str, str] = field(default_factory=dict)  # dropped duplicate link id -> surviving link id

    def link(self, link_id: Any) -> Link | None:
        key = str(link_id)
        return self.links.get(self.aliases.get(key, key))

    def same_link(self, link_id: Any, link: Link) -> bool:
        key = str(link_id)
        return self.aliases.get(key, key) == link.id


@dataclass(frozen=True)
class Placed:
    """A node at a position in the expanded graph (the frontend's ExecutableNodeDTO)."""

    path: tuple[str, ...]  # ids of the subgraph instances that contain it, outermost first
    node_id: str
    scope_key: str

    @property
    def exec_id(self) -> str:
        return ":".join((*self.path, self.node_id))

    @property
    def parent_id(self) -> str:
        return ":".join(self.path)


def parse_links(raw_links: Any, where: str, nodes: dict[str, dict[str, Any]]) -> tuple[dict[str, Link], dict[str, str]]:
    """Links by id, and aliases for the duplicates the editor drops on load.

    Only one link can end at an input: of several links to the same slot the first listed is kept, unless a
    later one is the one the node's input names and the first is not; references to a dropped link then
    mean the survivor.
    """
    parsed: list[Link] = []
    fields: list[Any]
    for raw in raw_links or []:
        if isinstance(raw, dict):
            fields = [raw.get(k) for k in ("id", "origin_id", "origin_slot", "target_id", "target_slot", "type")]
        elif isinstance(raw, (list, tuple)) and len(raw) >= 5:
            fields = list(raw[:6]) + [None] * (6 - len(raw[:6]))
        else:
            raise WorkflowFormatError(f"{where}: malformed link entry {raw!r}")
        link_id, origin_id, origin_slot, target_id, target_slot, link_type = fields
        parsed.append(Link(str(link_id), str(origin_id), int(origin_slot), str(target_id), int(target_slot), link_type))
    referenced = {str(slot.get("link")) for node in nodes.values() for slot in node.get("inputs") or []
                  if slot.get("link") is not None}
    kept: list[Link] = []
    slot_owner: dict[tuple[str, int], int] = {}
    aliases: dict[str, str] = {}
    for link in parsed:
        target = (link.target_id, link.target_slot)
        if target not in slot_owner:
            slot_owner[target] = len(kept)
            kept.append(link)
            continue
        survivor = kept[slot_owner[target]]
        same_origin = (survivor.origin_id, survivor.origin_slot) == (link.origin_id, link.origin_slot)
        if not same_origin and link.id in referenced and survivor.id not in referenced:
            kept[slot_owner[target]] = link
            aliases = {old: (link.id if new == survivor.id else new) for old, new in aliases.items()}
            aliases[survivor.id] = link.id
        else:
            aliases[link.id] = survivor.id
    return {link.id: link for link in kept}, aliases


def _nodes_by_id(nodes: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    by_id: dict[str, dict[str, Any]] = {}
    for node in nodes:
        by_id.setdefault(str(node.get("id")), node)  # the editor keeps the first of duplicated ids
    return by_id


def _subgraph_definitions(workflow: dict[str, Any]) -> list[dict[str, Any]]:
    """Definitions in the editor's order: each one followed by its own nested definitions, first id wins."""
    ordered: list[dict[str, Any]] = []
    seen: set[str] = set()
    stack = list(reversed((workflow.get("definitions") or {}).get("subgraphs") or []))
    while stack:
        definition = stack.pop()
        if str(definition.get("id")) not in seen:
            seen.add(str(definition.get("id")))
            ordered.append(definition)
        stack += reversed((definition.get("definitions") or {}).get("subgraphs") or [])
    return ordered


def _last_node_id(workflow: dict[str, Any]) -> int:
    value = workflow.get("last_node_id", (workflow.get("state") or {}).get("lastNodeId", 0))
    return value if isinstance(value, int) and value >= 0 else 0


def _renumber_clashing_ids(scopes: list[Scope], root: Scope, last_node_id: int) -> None:
    """Give inner nodes whose id is already taken (by the root or an earlier subgraph) a fresh number.

    The editor does this on load so that node ids are unique across the whole file; the new ids are what
    its Export (API) uses in execution ids, so we must renumber identically: next after the highest id seen.
    """
    used = set(root.nodes)
    used_numbers = {int(node_id) for node_id in used if node_id.isdigit()}
    last = last_node_id
    for scope in scopes:
        renamed: dict[str, str] = {}
        for node_id in list(scope.nodes):
            if node_id in used:
                fresh = last + 1
                while fresh in used_numbers:
                    fresh += 1
                last = fresh
                used_numbers.add(fresh)
                used.add(str(fresh))
                renamed[node_id] = str(fresh)
            else:
                used.add(node_id)
                if node_id.isdigit():
                    used_numbers.add(int(node_id))
                    last = max(last, int(node_id))
        if not renamed:
            continue
        scope.nodes = {renamed.get(node_id, node_id): node for node_id, node in scope.nodes.items()}
        scope.links = {
            link_id: Link(link.id, renamed.get(link.origin_id, link.origin_id), link.origin_slot,
                          renamed.get(link.target_id, link.target_id), link.target_slot, link.type)
            for link_id, link in scope.links.items()
        }


def _expect(value: Any, kinds: tuple[type, ...], where: str, what: str, allow_null: bool = True) -> None:
    if not isinstance(value, kinds) and not (allow_null and value is None):
        shown = "null" if value is None else type(value).__name__
        raise WorkflowFormatError(f"malformed UI workflow: {where} is {shown}, expected {what}")


def check_shape(workflow: dict[str, Any]) -> None:
    """The containers the converter walks must have the shapes the editor writes; otherwise a clear error naming
    the place ('nodes[3] is null, expected a node object') instead of an AttributeError deep inside."""
    graphs: list[tuple[dict[str, Any], str]] = [(workflow, "")]
    while graphs:
        graph, where = graphs.pop()
        nodes = graph.get("nodes")
        _expect(nodes, (list,), f"{where}nodes", "a list")
        for index, node in enumerate(nodes or []):
            place = f"{where}nodes[{index}]"
            _expect(node, (dict,), place, "a node object", allow_null=False)
            for key in ("inputs", "outputs"):
                _expect(node.get(key), (list,), f"{place}.{key}", "a list")
                for slot_index, slot in enumerate(node.get(key) or []):
                    _expect(slot, (dict,), f"{place}.{key}[{slot_index}]", "a slot object", allow_null=False)
            _expect(node.get("widgets_values"), (list, dict), f"{place}.widgets_values", "a list")
            _expect(node.get("properties"), (dict,), f"{place}.properties", "an object")
        _expect(graph.get("links"), (list,), f"{where}links", "a list")
        for key in ("inputs", "outputs"):
            if where:  # a subgraph definition's own input and output slots
                _expect(graph.get(key), (list,), f"{where}{key}", "a list")
                for slot_index, slot in enumerate(graph.get(key) or []):
                    _expect(slot, (dict,), f"{where}{key}[{slot_index}]", "a slot object", allow_null=False)
        definitions = graph.get("definitions")
        _expect(definitions, (dict,), f"{where}definitions", "an object")
        subgraphs = (definitions or {}).get("subgraphs")
        _expect(subgraphs, (list,), f"{where}definitions.subgraphs", "a list")
        for index, definition in enumerate(subgraphs or []):
            place = f"{where}definitions.subgraphs[{index}]"
            _expect(definition, (dict,), place, "a subgraph object", allow_null=False)
            graphs.append((definition, place + "."))


def parse_scopes(workflow: dict[str, Any]) -> tuple[dict[str, Scope], set[str]]:
    if not isinstance(workflow.get("nodes"), list):
        raise WorkflowFormatError("not a UI workflow: it has no 'nodes' list")
    check_shape(workflow)
    root_nodes = _nodes_by_id(workflow["nodes"])
    root_links, root_aliases = parse_links(workflow.get("links"), "workflow", root_nodes)
    root = Scope("", root_nodes, root_links, aliases=root_aliases)
    subgraphs = []
    for definition in _subgraph_definitions(workflow):
        nodes = _nodes_by_id(definition.get("nodes") or [])
        where = f"subgraph {definition.get('name') or definition.get('id')}"
        links, aliases = parse_links(definition.get("links"), where, nodes)
        subgraphs.append(Scope(str(definition.get("id")), nodes, links, definition, aliases))
    _renumber_clashing_ids(subgraphs, root, _last_node_id(workflow))
    scopes = {"": root, **{scope.key: scope for scope in subgraphs}}
    return scopes, set(scopes) - {""}
