"""`io.DynamicCombo`, `io.Autogrow` and `io.BoundingBox` of ComfyUI's V3 API (part of `comfy_api.latest.io`).

Dynamic inputs stand for several inputs of the prompt, named with dotted keys as the editor sends them:
a DynamicCombo `k` is the combo `k` plus the inputs of the selected option, `k.<sub id>`; an Autogrow `g` is the
numbered (`g.<prefix>0`, `g.<prefix>1`, ...) or named (`g.<name>`) copies of its template input. `execute` gets
each as one dict: `k={"k": selected key, <sub id>: value, ...}`, `g={<slot name>: value, ...}` (only the
slots the prompt fills). `as_dict()` is the catalogue (/object_info) form the editor builds its widgets from:
`["COMFY_DYNAMICCOMBO_V3", {"options": [{"key", "inputs": {"required", "optional"}}]}]` and
`["COMFY_AUTOGROW_V3", {"template": {"input", "prefix" | "names", "min", "max"}}]`. latentloom.nodes.
comfy_compat.v3_dynamic turns them into the node's flat inputs and back.

A BoundingBox is a widget whose value is a dict {x, y, width, height} (pixels).
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

from ._io import ComfyTypeI, ComfyTypeIO, Input, WidgetInput, _pruned, comfytype

AUTOGROW_MAX_NAMES = 100  # ComfyUI's cap on an Autogrow's slots


def create_input_dict_v1(inputs: list[Any]) -> dict[str, dict[str, Any]]:
    """V1 INPUT_TYPES sections ({"required": {...}, "optional": {...}}) for a list of inputs, as ComfyUI lists
    the inputs inside a dynamic input."""
    sections: dict[str, dict[str, Any]] = {"required": {}}
    for item in inputs:
        options = item.as_dict()
        options.pop("optional", None)
        sections.setdefault("optional" if item.optional else "required", {})[item.id] = [item.get_io_type(), options]
    return sections


class DynamicInput(Input):
    """An input that stands for several inputs of the prompt (see the module docstring)."""

    def get_all(self) -> list[Any]:
        return [self]


@comfytype(io_type="COMFY_DYNAMICCOMBO_V3")
class DynamicCombo(ComfyTypeI):
    """A combo whose selected option brings inputs of its own."""

    Type = dict

    class Option:
        def __init__(self, key: str, inputs: list[Any] | None = None):
            self.key = key
            self.inputs = list(inputs or [])

        def as_dict(self) -> dict[str, Any]:
            return {"key": self.key, "inputs": create_input_dict_v1(self.inputs)}

    class Input(DynamicInput):
        def __init__(self, id: str, options: list[Any], display_name: str | None = None, optional: bool = False,
                     tooltip: str | None = None, lazy: bool | None = None,
                     extra_dict: dict[str, Any] | None = None, advanced: bool | None = None):
            super().__init__(id, display_name, optional, tooltip, lazy, extra_dict, advanced)
            self.options = list(options)
            keys = [option.key for option in self.options]
            if not keys or len(set(keys)) != len(keys):
                raise ValueError(f"DynamicCombo '{id}' needs options with distinct keys, got {keys}")

        def option(self, key: Any) -> Any:
            return next((option for option in self.options if option.key == key), None)

        def get_all(self) -> list[Any]:
            return [self] + [item for option in self.options for item in option.inputs]

        def as_dict(self) -> dict[str, Any]:
            return super().as_dict() | {"options": [option.as_dict() for option in self.options]}


@comfytype(io_type="COMFY_AUTOGROW_V3")
class Autogrow(ComfyTypeI):
    """Copies of one template input that the editor adds as they are connected."""

    Type = dict

    class _Template:
        def __init__(self, input: Any, names: list[str], min: int):
            if isinstance(input, DynamicInput):
                raise TypeError("an Autogrow template cannot be a dynamic input")
            if min < 0:
                raise ValueError(f"Autogrow min must be 0 or more, got {min}")
            self.input = copy.copy(input)
            if isinstance(self.input, WidgetInput):
                self.input.force_input = True  # the copies are sockets
            self.names = list(names)
            self.min = min

        def slot(self, name: str) -> Any:
            """The template input as the slot `name`."""
            made = copy.copy(self.input)
            made.id = name
            return made

        def get_all(self) -> list[Any]:
            return [self.slot(name) for name in self.names]

        def as_dict(self) -> dict[str, Any]:
            return {"input": create_input_dict_v1([self.input])}

    class TemplatePrefix(_Template):
        """Slots `<prefix>0`, `<prefix>1`, ... up to max."""

        def __init__(self, input: Any, prefix: str, min: int = 1, max: int = 10):
            if not 1 <= max <= AUTOGROW_MAX_NAMES:
                raise ValueError(f"Autogrow max must be between 1 and {AUTOGROW_MAX_NAMES}, got {max}")
            super().__init__(input, [f"{prefix}{index}" for index in range(max)], min)
            self.prefix = prefix
            self.max = max

        def as_dict(self) -> dict[str, Any]:
            return super().as_dict() | {"prefix": self.prefix, "min": self.min, "max": self.max}

    class TemplateNames(_Template):
        """Slots with the given names, in order."""

        def __init__(self, input: Any, names: list[str], min: int = 1):
            super().__init__(input, list(names)[:AUTOGROW_MAX_NAMES], min)

        def as_dict(self) -> dict[str, Any]:
            return super().as_dict() | {"names": self.names, "min": self.min}

    class Input(DynamicInput):
        def __init__(self, id: str, template: Any, display_name: str | None = None, optional: bool = False,
                     tooltip: str | None = None, lazy: bool | None = None,
                     extra_dict: dict[str, Any] | None = None):
            super().__init__(id, display_name, optional, tooltip, lazy, extra_dict)
            self.template = template

        def get_all(self) -> list[Any]:
            return [self] + self.template.get_all()

        def as_dict(self) -> dict[str, Any]:
            return super().as_dict() | {"template": self.template.as_dict()}


@comfytype(io_type="BOUNDING_BOX")
class BoundingBox(ComfyTypeIO):
    """A rectangle {x, y, width, height} in pixels; the editor draws it as a box widget (or an image crop)."""

    Type = dict
    DEFAULT: ClassVar[dict[str, int]] = {"x": 0, "y": 0, "width": 512, "height": 512}

    class Input(WidgetInput):
        def __init__(self, id: str, display_name: str | None = None, optional: bool = False,
                     tooltip: str | None = None, socketless: bool = True, default: dict[str, Any] | None = None,
                     component: str | None = None, force_input: bool | None = None):
            super().__init__(id, display_name, optional, tooltip, None,
                             dict(default) if default is not None else dict(BoundingBox.DEFAULT), socketless)
            self.component = component
            self.force_input = force_input

        def as_dict(self) -> dict[str, Any]:
            return super().as_dict() | _pruned({"component": self.component})


__all__ = ["Autogrow", "BoundingBox", "DynamicCombo", "DynamicInput", "create_input_dict_v1"]
