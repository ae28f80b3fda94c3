"""V3 schemas with dynamic inputs (`io.DynamicCombo`, `io.Autogrow`) as the flat inputs of a node, and back.

The prompt names the parts of a dynamic input with dotted keys (comfy_api/latest/_dynamic.py). The node declares
all of them: a DynamicCombo `k` is the combo `k` (its choices are the option keys, so an unknown key is "Value not
in list") listed in the catalogue as ComfyUI lists it, and every option's inputs as `k.<id>`, optional and not
listed; an Autogrow `g` is a catalogue-only entry plus its slots `g.<name>`, the first `min` required when the
template input is. So the engine validates them as usual: types, links, ranges. What depends on the selected
option is checked by `dynamic_problems` (the node's VALIDATE_INPUTS): that option's required inputs are there,
and inputs that two options declare differently (the engine cannot check those) fit the selected option's
declaration. `nest_inputs` gathers the flat values into the dicts `execute` receives, as ComfyUI does: the
combo's dict holds the selected key under the combo's own id and every input of the selected option (None when
not given); an Autogrow's dict the slots given, by slot name ({} when none). BoundingBox constants are checked
to be {x, y, width, height} dicts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .comfy_api.latest._io import Autogrow, BoundingBox, Combo, DynamicCombo, DynamicInput
from .v1 import LISTED_AS_OPTION, UNLISTED_OPTION

BOX_FIELDS = ("x", "y", "width", "height")


def v1_entry(item: Any) -> tuple[Any, dict[str, Any]]:
    """One plain V3 input as a V1 (TYPE, {options}) entry; combos as their choice list, so they are checked."""
    options = item.as_dict()
    options.pop("optional", None)
    kind = item.get_io_type()
    if kind == "COMBO" and options.get("options") is not None:
        kind = list(options.pop("options"))  # the legacy form: choices checked, listed in the catalogue
    return kind, options


@dataclass
class FlatInputs:
    """A schema's inputs as V1 INPUT_TYPES sections, and what `dynamic_problems` needs to know."""

    sections: dict[str, dict[str, Any]] = field(default_factory=lambda: {"required": {}})
    # Inputs declared by several options with different declarations: checked against the selected one.
    varying: set[str] = field(default_factory=set)

    def put(self, name: str, entry: tuple[Any, dict[str, Any]], optional: bool) -> None:
        section = "optional" if optional else "required"
        known = self.sections.get("optional", {}).get(name)
        if known is not None:
            if known != entry:  # another option's input of the same id: the engine checks only the type
                self.varying.add(name)
                if known[0] != entry[0]:
                    self.sections["optional"][name] = ("*", {UNLISTED_OPTION: True})
            return
        self.sections.setdefault(section, {})[name] = entry


def flatten(inputs: list[Any]) -> FlatInputs:
    """INPUT_TYPES for a schema's inputs (see the module docstring)."""
    flat = FlatInputs()
    # (input, prefix of its flat name, inside an option): walked depth first, in declaration order.
    stack: list[tuple[Any, str, bool]] = [(item, "", False) for item in reversed(inputs)]
    while stack:
        item, prefix, nested = stack.pop()
        name = prefix + item.id
        if isinstance(item, DynamicCombo.Input):
            shown = _catalogue_options(item)
            options: dict[str, Any] = {key: value for key, value in shown.items() if key in ("tooltip", "display_name")}
            if nested:
                options[UNLISTED_OPTION] = True
            else:
                options[LISTED_AS_OPTION] = (["COMFY_DYNAMICCOMBO_V3", shown], item.optional)
            flat.put(name, ([option.key for option in item.options], options), item.optional or nested)
            stack += [(sub, name + ".", True) for option in reversed(item.options) for sub in reversed(option.inputs)]
        elif isinstance(item, Autogrow.Input):
            if not nested:  # the catalogue's entry; no such input reaches the node
                listed = ["COMFY_AUTOGROW_V3", _catalogue_options(item)]
                flat.put(name, ("COMFY_AUTOGROW_V3", {LISTED_AS_OPTION: (listed, item.optional)}), True)
            template = item.template
            for index, slot in enumerate(template.names):
                kind, options = v1_entry(template.slot(slot))
                required = not nested and index < template.min and not template.input.optional
                flat.put(f"{name}.{slot}", (kind, options | {UNLISTED_OPTION: True}), not required)
        else:
            kind, options = v1_entry(item)
            if nested:
                options[UNLISTED_OPTION] = True
            flat.put(name, (kind, options), item.optional or nested)
    return flat


def _catalogue_options(item: Any) -> dict[str, Any]:
    options = item.as_dict()
    options.pop("optional", None)
    return options


def has_dynamic_parts(inputs: list[Any]) -> bool:
    """Whether a schema needs `dynamic_problems` / `nest_inputs`: dynamic inputs or bounding boxes."""
    return any(isinstance(item, (DynamicInput, BoundingBox.Input)) for item in inputs)


def _value_problem(item: Any, value: Any) -> str | None:
    """The selected option's own range / choice check of a constant (for inputs options declare differently)."""
    if isinstance(item, Combo.Input) and item.options is not None and value not in item.options:
        return f"'{value}' not in {list(item.options)}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    low, high = getattr(item, "min", None), getattr(item, "max", None)
    if low is not None and value < low:
        return f"Value {value} smaller than min of {low}"
    if high is not None and value > high:
        return f"Value {value} bigger than max of {high}"
    return None


def box_problem(value: Any) -> str | None:
    """Why a BOUNDING_BOX constant is not a box, or None."""
    if not isinstance(value, dict) or any(key not in value for key in BOX_FIELDS):
        return f"a bounding box must be an object with x, y, width and height, got {value!r}"
    numbers = {key: value[key] for key in BOX_FIELDS}
    if any(isinstance(number, bool) or not isinstance(number, (int, float)) for number in numbers.values()):
        return f"x, y, width and height must be numbers, got {numbers}"
    if numbers["x"] < 0 or numbers["y"] < 0 or numbers["width"] <= 0 or numbers["height"] <= 0:
        return f"x and y must be 0 or more, width and height more than 0, got {numbers}"
    return None


def dynamic_problems(inputs: list[Any], constants: dict[str, Any], linked: set[str],
                     varying: set[str]) -> dict[str, str]:
    """{flat input name: problem} for what the declaration cannot express (see the module docstring)."""
    problems: dict[str, str] = {}
    stack: list[tuple[Any, str]] = [(item, "") for item in reversed(inputs)]
    while stack:
        item, prefix = stack.pop()
        name = prefix + item.id
        given = name in constants or name in linked
        if isinstance(item, Autogrow.Input):
            template = item.template
            if prefix and not template.input.optional:  # nested: its slots were declared optional
                for slot in template.names[:template.min]:
                    if f"{name}.{slot}" not in constants and f"{name}.{slot}" not in linked:
                        problems[f"{name}.{slot}"] = "Required input is missing"
            continue
        if prefix and not item.optional and not given:
            problems[name] = "Required input is missing"  # an input of the selected option
            continue
        if name not in constants:
            continue
        value = constants[name]
        if isinstance(item, DynamicCombo.Input):
            option = item.option(value)
            if option is not None:
                stack += [(sub, name + ".") for sub in reversed(option.inputs)]
        elif isinstance(item, BoundingBox.Input):
            problem = box_problem(value)
            if problem:
                problems[name] = problem
        elif name in varying:
            problem = _value_problem(item, value)
            if problem:
                problems[name] = problem
    return problems


def nest_inputs(inputs: list[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of a V3 call: the flat parts of dynamic inputs gathered into their dicts."""
    values = dict(kwargs)
    parts = tuple(f"{item.id}." for item in inputs if isinstance(item, DynamicInput))
    nested: dict[str, Any] = {key: value for key, value in kwargs.items() if not key.startswith(parts)}
    # (input, prefix of its flat name, the dict that receives it)
    stack: list[tuple[Any, str, dict[str, Any]]] = [(item, "", nested) for item in reversed(inputs)
                                                     if isinstance(item, DynamicInput)]
    while stack:
        item, prefix, target = stack.pop()
        name = prefix + item.id
        if isinstance(item, Autogrow.Input):
            target[item.id] = {slot: values[f"{name}.{slot}"] for slot in item.template.names
                               if f"{name}.{slot}" in values}
        elif isinstance(item, DynamicCombo.Input):
            if name not in values:
                target.pop(item.id, None)
                continue
            option = item.option(values[name])
            if option is None:
                continue
            chosen: dict[str, Any] = {item.id: values[name]}
            target[item.id] = chosen
            for sub in reversed(option.inputs):
                if isinstance(sub, DynamicInput):
                    stack.append((sub, name + ".", chosen))
                else:
                    chosen[sub.id] = values.get(f"{name}.{sub.id}")
        elif prefix:
            target[item.id] = values.get(name)
    return nested


__all__ = ["FlatInputs", "box_problem", "dynamic_problems", "flatten", "has_dynamic_parts", "nest_inputs",
           "v1_entry"]
