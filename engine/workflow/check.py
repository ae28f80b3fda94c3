"""Structural checks of an API prompt against the catalogue (no values, no models: just the wiring)."""

from __future__ import annotations

from typing import Any

from latentloom.engine.workflow.catalogue import spec_type_and_options, ui_link_types_compatible


def _is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def prompt_problems(prompt: dict[str, dict[str, Any]], catalogue: dict[str, dict[str, Any]]) -> list[str]:
    """Every wiring problem: unknown class types, links to absent nodes or outputs, type mismatches,
    required inputs left empty. An empty list means the prompt is well-formed for this catalogue."""
    problems: list[str] = []
    for node_id, entry in prompt.items():
        class_type = entry.get("class_type")
        info = catalogue.get(class_type) if isinstance(class_type, str) else None
        if info is None:
            problems.append(f"node {node_id}: unknown class type {class_type!r}")
            continue
        declared = {**(info.get("input") or {}).get("optional", {}), **(info.get("input") or {}).get("required", {})}
        inputs = entry.get("inputs") or {}
        for name, value in inputs.items():
            if not _is_link(value):
                continue
            source = prompt.get(value[0])
            if source is None:
                problems.append(f"node {node_id} input {name!r}: links to missing node {value[0]!r}")
                continue
            outputs = (catalogue.get(str(source.get("class_type"))) or {}).get("output") or []
            if not 0 <= value[1] < len(outputs):
                problems.append(f"node {node_id} input {name!r}: node {value[0]!r} has no output {value[1]}")
                continue
            if name in declared:
                wanted = spec_type_and_options(declared[name])[0]
                produced = outputs[value[1]]
                produced_type = "COMBO" if isinstance(produced, list) else produced
                if not ui_link_types_compatible(wanted, produced_type):
                    problems.append(
                        f"node {node_id} input {name!r}: expects {wanted}, gets {produced_type} from node {value[0]!r}")
        for name in (info.get("input") or {}).get("required", {}):
            if name not in inputs:
                problems.append(f"node {node_id} ({class_type}): required input {name!r} is missing")
    return problems
