"""What the editor builds for a node type, derived from a ComfyUI `/object_info` catalogue entry.

Both converters need the same facts the ComfyUI frontend derives when it instantiates a node: which inputs
are link-only sockets, which become widgets (and in which order their values sit in `widgets_values`),
and which extra widgets the editor adds that never reach the API prompt (the `control_after_generate`
combo after seed widgets, the combo filter text, the upload button of media combos).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

# Input types for which the frontend (1.58) creates a widget; anything else is a link-only socket. (The engine's
# own widget types, which its nodes declare, are engine.types.WIDGET_TYPES.)
UI_WIDGET_TYPES = frozenset(
    {
        "INT", "FLOAT", "BOOLEAN", "STRING", "COMBO", "MARKDOWN", "IMAGEUPLOAD", "COLOR", "IMAGECOMPARE",
        "BOUNDING_BOX", "CHART", "GALLERIA", "PAINTER", "COMPOSITOR", "TEXTAREA", "CURVE", "RANGE",
        "VIDEO_EDIT", "RESOLUTION_PREVIEW", "BOUNDING_BOXES", "LIGHT_INFO_PREVIEW", "COLORS",
    }
)
# V3 dynamic inputs grow or retype sockets at edit time; their widget layout is not derivable statically.
DYNAMIC_INPUT_TYPES = frozenset(
    {"COMFY_DYNAMICCOMBO_V3", "COMFY_DYNAMICGROUP_V3", "COMFY_AUTOGROW_V3", "COMFY_MATCHTYPE_V3"}
)
CONTROL_MODES = ("fixed", "increment", "decrement", "randomize")
MEDIA_UPLOAD_FLAGS = ("image_upload", "video_upload", "animated_image_upload")
# Frontend extension that adds a (non-persisted) audio player widget to these core classes.
AUDIO_UI_CLASSES = frozenset(
    {"LoadAudio", "SaveAudio", "PreviewAudio", "SaveAudioMP3", "SaveAudioOpus", "SaveAudioAdvanced"}
)
SEED_NAMES = ("seed", "noise_seed")

# Editor-only node types that never reach the API prompt.
NOTE_TYPES = frozenset({"Note", "MarkdownNote"})
REROUTE_TYPE = "Reroute"
PRIMITIVE_NODE_TYPE = "PrimitiveNode"
# Named wireless links from the KJNodes pack, common in shared workflows: a GetNode outputs whatever the
# SetNode with the same name (its first widget value) receives.
SET_NODE_TYPE = "SetNode"
GET_NODE_TYPE = "GetNode"
VIRTUAL_TYPES = NOTE_TYPES | {REROUTE_TYPE, PRIMITIVE_NODE_TYPE, SET_NODE_TYPE, GET_NODE_TYPE}
# Purely decorative custom-node types seen in shared workflows (labels, bookmarks, group togglers).
DECORATIVE_TYPES = frozenset(
    {
        "Label (rgthree)", "Bookmark (rgthree)", "Fast Groups Bypasser (rgthree)",
        "Fast Groups Muter (rgthree)", "Fast Bypasser (rgthree)", "Fast Muter (rgthree)",
        "Note Plus (mtb)",
    }
)

WidgetKind = Literal["value", "control", "filter", "upload", "ui", "part"]
BOUNDING_BOX_PARTS = ("x", "y", "width", "height")  # number widgets the editor adds after a BOUNDING_BOX


class WorkflowFormatError(ValueError):
    """A workflow document that cannot be read or converted; the message says why."""


@dataclass(frozen=True)
class WidgetSlot:
    """One entry of a node's widget list, in the order of `widgets_values`."""

    name: str
    kind: WidgetKind
    default: Any
    persisted: bool = True  # has a place in widgets_values
    dynamic_prompts: bool = False

    @property
    def in_prompt(self) -> bool:
        return self.kind == "value"


@dataclass(frozen=True)
class SocketSlot:
    name: str
    type: str
    optional: bool


@dataclass(frozen=True)
class OutputSlot:
    name: str
    type: str
    is_list: bool


@dataclass(frozen=True)
class NodeLayout:
    class_type: str
    display_name: str
    sockets: tuple[SocketSlot, ...]  # link-only inputs, in input order
    widgets: tuple[WidgetSlot, ...]  # every widget, companions included
    widget_types: dict[str, str]  # widget input name -> its socket type (for converted widgets)
    outputs: tuple[OutputSlot, ...]

    @property
    def persisted_widgets(self) -> list[WidgetSlot]:
        return [w for w in self.widgets if w.persisted]

    def socket_type(self, input_name: str) -> str | None:
        for socket in self.sockets:
            if socket.name == input_name:
                return socket.type
        return self.widget_types.get(input_name)


def spec_type_and_options(spec: Any) -> tuple[str, dict[str, Any], list[Any] | None]:
    """(type, options, combo options) of an object_info input spec, legacy or V2 combo form."""
    if not isinstance(spec, (list, tuple)) or not spec:
        return "*", {}, None
    raw_type = spec[0]
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if isinstance(raw_type, (list, tuple)):
        return "COMBO", options, list(raw_type)
    if raw_type == "COMBO":
        return "COMBO", options, list(options.get("options") or [])
    return str(raw_type), options, None


def _widget_default(type_name: str, options: dict[str, Any], combo: list[Any] | None) -> Any:
    if "default" in options:
        return options["default"]
    if type_name == "COMBO":
        return combo[0] if combo else None
    return {"INT": 0, "FLOAT": 0, "STRING": "", "BOOLEAN": False}.get(type_name)


def _ordered_inputs(entry: dict[str, Any], extra_required: list[tuple[str, Any]]) -> list[tuple[str, Any, bool]]:
    """Inputs as the frontend orders them: input_order.required, input_order.optional, then the rest."""
    inputs = entry.get("input") or {}
    required = dict(inputs.get("required") or {})
    optional = dict(inputs.get("optional") or {})
    for name, spec in extra_required:
        required[name] = spec
    merged: dict[str, tuple[Any, bool]] = {name: (spec, False) for name, spec in required.items()}
    for name, spec in optional.items():
        merged.setdefault(name, (spec, True))
    order = entry.get("input_order")
    if not order:
        return [(name, spec, is_optional) for name, (spec, is_optional) in merged.items()]
    ordered: list[tuple[str, Any, bool]] = []
    seen: set[str] = set()
    for category, want_optional in (("required", False), ("optional", True)):
        for name in order.get(category) or []:
            if name in merged and merged[name][1] == want_optional and name not in seen:
                ordered.append((name, merged[name][0], want_optional))
                seen.add(name)
    ordered += [(name, spec, opt) for name, (spec, opt) in merged.items() if name not in seen]
    return ordered


def _companion_widgets(name: str, type_name: str, options: dict[str, Any]) -> list[WidgetSlot]:
    """Widgets the editor appends after a value widget (value-control combo, combo filter)."""
    control = options.get("control_after_generate")
    if control is None and type_name == "INT":
        control = name in SEED_NAMES
    if type_name not in ("INT", "FLOAT", "COMBO") or not control:
        return []
    default_mode = control if isinstance(control, str) and control in CONTROL_MODES else "randomize"
    control_name = "control_after_generate"
    if isinstance(options.get("control_prefix"), str):
        control_name = f"{options['control_prefix']} {control_name}"
    widgets = [WidgetSlot(control_name, "control", default_mode)]
    if type_name == "COMBO":
        filter_name = "control_filter_list"
        if isinstance(options.get("control_prefix"), str):
            filter_name = f"{options['control_prefix']} {filter_name}"
        widgets.append(WidgetSlot(filter_name, "filter", ""))
    return widgets


def node_layout(class_type: str, catalogue: dict[str, dict[str, Any]]) -> NodeLayout:
    """The sockets, widgets and outputs the frontend creates for `class_type`."""
    entry = catalogue.get(class_type)
    if entry is None:
        raise WorkflowFormatError(f"node type {class_type!r} is not in the node catalogue")
    extra: list[tuple[str, Any]] = []
    for spec in (entry.get("input") or {}).get("required", {}).values():
        type_name, options, _ = spec_type_and_options(spec)
        if type_name == "COMBO" and any(options.get(flag) is True for flag in MEDIA_UPLOAD_FLAGS):
            extra.append(("upload", ["IMAGEUPLOAD", {}]))
            break
    if class_type in AUDIO_UI_CLASSES:
        extra.append(("audioUI", ["AUDIO_UI", {}]))
        audio_spec = (entry.get("input") or {}).get("required", {}).get("audio")
        if audio_spec and spec_type_and_options(audio_spec)[1].get("audio_upload") is True:
            extra.append(("upload", ["AUDIOUPLOAD", {}]))

    sockets: list[SocketSlot] = []
    widgets: list[WidgetSlot] = []
    widget_types: dict[str, str] = {}
    for name, spec, is_optional in _ordered_inputs(entry, extra):
        type_name, options, combo = spec_type_and_options(spec)
        if type_name in DYNAMIC_INPUT_TYPES:
            raise WorkflowFormatError(
                f"node type {class_type!r}: input {name!r} has the dynamic input type {type_name}, "
                "which the workflow converter does not support"
            )
        force_input = bool(options.get("forceInput")) or (is_optional and bool(options.get("defaultInput")))
        if type_name == "IMAGEUPLOAD" or type_name == "AUDIOUPLOAD":
            widgets.append(WidgetSlot(name, "upload", "image" if type_name == "IMAGEUPLOAD" else None))
            continue
        if type_name in ("AUDIO_UI", "RESOLUTION_PREVIEW"):  # display-only widgets: neither saved nor sent
            widgets.append(WidgetSlot(name, "ui", None, persisted=False))
            continue
        if type_name == "IMAGECOMPARE" and not force_input:  # sent with the prompt but not saved in the file
            widget_types[name] = type_name
            widgets.append(WidgetSlot(name, "value", _widget_default(type_name, options, combo), persisted=False))
            continue
        if type_name not in UI_WIDGET_TYPES or force_input:
            sockets.append(SocketSlot(name, type_name, is_optional))
            continue
        widget_types[name] = type_name
        widgets.append(
            WidgetSlot(
                name,
                "value",
                _widget_default(type_name, options, combo),
                dynamic_prompts=type_name == "STRING" and options.get("dynamicPrompts") is True,
            )
        )
        widgets += _companion_widgets(name, type_name, options)
        if type_name == "BOUNDING_BOX":
            default = options.get("default")
            bounds = default if isinstance(default, dict) else {}
            widgets += [WidgetSlot(part, "part", bounds.get(part, 0)) for part in BOUNDING_BOX_PARTS]

    output_types = entry.get("output") or []
    output_names = entry.get("output_name") or []
    output_lists = entry.get("output_is_list") or []
    outputs = []
    for index, out_type in enumerate(output_types):
        type_name = "COMBO" if isinstance(out_type, (list, tuple)) else str(out_type)
        name = output_names[index] if index < len(output_names) else type_name
        is_list = bool(output_lists[index]) if index < len(output_lists) else False
        outputs.append(OutputSlot(str(name), type_name, is_list))
    return NodeLayout(
        class_type=class_type,
        display_name=str(entry.get("display_name") or class_type),
        sockets=tuple(sockets),
        widgets=tuple(widgets),
        widget_types=widget_types,
        outputs=tuple(outputs),
    )


def ui_link_types_compatible(type_a: Any, type_b: Any) -> bool:
    """LiteGraph's connection rule (the editor's, used when converting UI workflows): wildcards match, otherwise a
    case-insensitive match of any union member. Validation uses engine.types.types_compatible."""
    a = "" if type_a in (None, "*", 0) else str(type_a)
    b = "" if type_b in (None, "*", 0) else str(type_b)
    if not a or not b or a == b:
        return True
    a_members = [member for member in a.lower().split(",")]
    b_members = [member for member in b.lower().split(",")]
    return any(x in ("", "*") or y in ("", "*") or x == y for x in a_members for y in b_members)
