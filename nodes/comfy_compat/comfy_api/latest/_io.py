"""`comfy_api.latest.io`: how V3 nodes declare themselves (ComfyUI's API, written from its documented behaviour).

A V3 node is a `ComfyNode` subclass with classmethods `define_schema()` -> `Schema` and `execute(**inputs)` ->
`NodeOutput`, optionally `validate_inputs`, `fingerprint_inputs` and `check_lazy_status`. Socket types are
`ComfyType` classes (`Int`, `Image`, `Custom("MY_TYPE")`, ...) whose nested `Input` / `Output` classes describe
one input or output. This module only describes; latentloom.nodes.comfy_compat.v3 turns a schema into a node.
`as_dict()` gives the options of an input in ComfyUI's V1 encoding (`{"default": 1, "min": 0, ...}`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from typing import Any, ClassVar

from latentloom.engine.node import ExecutionBlocker


def _pruned(values: dict[str, Any]) -> dict[str, Any]:
    """The options that are set (None is "not given"; False is kept, as ComfyUI sends it)."""
    return {key: value for key, value in values.items() if value is not None}


class FolderType(StrEnum):
    input = "input"
    output = "output"
    temp = "temp"


class UploadType(StrEnum):
    image = "image_upload"
    audio = "audio_upload"
    video = "video_upload"
    model = "file_upload"


class NumberDisplay(StrEnum):
    number = "number"
    slider = "slider"


class RemoteOptions:
    """A combo whose choices the editor fetches from a route."""

    def __init__(self, route: str, refresh_button: bool, control_after_refresh: str = "first",
                 timeout: int | None = None, max_retries: int | None = None, refresh: int | None = None):
        self.options = {"route": route, "refresh_button": refresh_button,
                        "control_after_refresh": control_after_refresh, "timeout": timeout,
                        "max_retries": max_retries, "refresh": refresh}

    def as_dict(self) -> dict[str, Any]:
        return {key: value for key, value in self.options.items() if value is not None}


# Inputs and outputs -----------------------------------------------------------------------------------------------

class _ComfyType:
    """A socket type: `io_type` is its name on the wire; `Input` / `Output` describe one socket of it."""

    io_type: ClassVar[str | None] = None
    Type: ClassVar[Any] = Any


class Input:
    """One input of a schema; `Parent` (set by @comfytype) is the ComfyType it belongs to."""

    Parent: ClassVar[type[_ComfyType]] = _ComfyType

    def __init__(self, id: str, display_name: str | None = None, optional: bool = False, tooltip: str | None = None,
                 lazy: bool | None = None, extra_dict: dict[str, Any] | None = None, advanced: bool | None = None):
        self.id = id
        self.advanced = advanced
        self.display_name = display_name
        self.optional = optional
        self.tooltip = tooltip
        self.lazy = lazy
        self.extra_dict = dict(extra_dict or {})

    @property
    def io_type(self) -> Any:
        return self.Parent.io_type

    def get_io_type(self) -> Any:
        return self.io_type

    def as_dict(self) -> dict[str, Any]:
        return _pruned({"display_name": self.display_name, "optional": self.optional, "tooltip": self.tooltip,
                        "lazy": self.lazy, "advanced": self.advanced}) | _pruned(self.extra_dict)


class WidgetInput(Input):
    """An input the editor can show as a widget."""

    def __init__(self, id: str, display_name: str | None = None, optional: bool = False, tooltip: str | None = None,
                 lazy: bool | None = None, default: Any = None, socketless: bool | None = None,
                 widget_type: str | None = None, force_input: bool | None = None,
                 extra_dict: dict[str, Any] | None = None):
        super().__init__(id, display_name, optional, tooltip, lazy, extra_dict)
        self.default = default
        self.socketless = socketless
        self.widget_type = widget_type
        self.force_input = force_input

    def get_io_type(self) -> Any:
        return self.widget_type if self.widget_type is not None else self.io_type

    def as_dict(self) -> dict[str, Any]:
        return super().as_dict() | _pruned({"default": self.default, "socketless": self.socketless,
                                            "widgetType": self.widget_type, "forceInput": self.force_input})


class Output:
    Parent: ClassVar[type[_ComfyType]] = _ComfyType

    def __init__(self, id: str | None = None, display_name: str | None = None, tooltip: str | None = None,
                 is_output_list: bool = False):
        self.id = id
        self.display_name = display_name
        self.tooltip = tooltip
        self.is_output_list = is_output_list

    @property
    def io_type(self) -> Any:
        return self.Parent.io_type

    def get_io_type(self) -> Any:
        return self.io_type

    def as_dict(self) -> dict[str, Any]:
        return _pruned({"display_name": self.display_name, "tooltip": self.tooltip,
                        "is_output_list": self.is_output_list})


class ComfyTypeI(_ComfyType):
    """A type that is only ever an input."""

    class Input(Input):
        pass


class ComfyTypeIO(ComfyTypeI):
    """A type that is an input and an output."""

    class Output(Output):
        pass


def comfytype(io_type: str, **_: Any) -> Callable[[type], Any]:
    """Bind `io_type` to a ComfyType class and give it Input / Output classes of its own (subclasses, so the
    shared bases are never modified)."""
    def decorate(cls: type) -> Any:
        target: Any = cls if issubclass(cls, _ComfyType) else \
            type(cls.__name__, (cls, ComfyTypeIO), {"__module__": cls.__module__, "__doc__": cls.__doc__})
        target.io_type = io_type
        for part in ("Input", "Output"):
            base = getattr(target, part, None)
            if isinstance(base, type):
                setattr(target, part, type(base.__name__, (base,), {
                    "Parent": target, "__module__": target.__module__,
                    "__qualname__": f"{target.__qualname__}.{part}"}))
        return target
    return decorate


def Custom(io_type: str) -> type[ComfyTypeIO]:  # noqa: N802 - ComfyUI's name
    """A ComfyType for a socket type of the pack's own."""
    return comfytype(io_type)(type(f"Custom_{io_type}", (ComfyTypeIO,), {"__module__": __name__}))


@comfytype(io_type="BOOLEAN")
class Boolean(ComfyTypeIO):
    Type = bool

    class Input(WidgetInput):
        def __init__(self, id: str, display_name: str | None = None, optional: bool = False,
                     tooltip: str | None = None, lazy: bool | None = None, default: bool | None = None,
                     label_on: str | None = None, label_off: str | None = None, socketless: bool | None = None,
                     force_input: bool | None = None, advanced: bool | None = None):
            super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, None, force_input)
            self.advanced = advanced
            self.label_on = label_on
            self.label_off = label_off

        def as_dict(self) -> dict[str, Any]:
            return super().as_dict() | _pruned({"label_on": self.label_on, "label_off": self.label_off})


class _NumberInput(WidgetInput):
    def __init__(self, id: str, display_name: str | None = None, optional: bool = False, tooltip: str | None = None,
                 lazy: bool | None = None, default: Any = None, min: Any = None, max: Any = None, step: Any = None,
                 control_after_generate: bool | None = None, display_mode: NumberDisplay | None = None,
                 socketless: bool | None = None, force_input: bool | None = None, round: Any = None,
                 advanced: bool | None = None):
        super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, None, force_input)
        self.advanced = advanced
        self.min, self.max, self.step, self.round = min, max, step, round
        self.control_after_generate = control_after_generate
        self.display_mode = display_mode

    def as_dict(self) -> dict[str, Any]:
        display = self.display_mode.value if isinstance(self.display_mode, Enum) else self.display_mode
        return super().as_dict() | _pruned({"min": self.min, "max": self.max, "step": self.step, "round": self.round,
                                            "control_after_generate": self.control_after_generate,
                                            "display": display})


@comfytype(io_type="INT")
class Int(ComfyTypeIO):
    Type = int

    class Input(_NumberInput):
        pass


@comfytype(io_type="FLOAT")
class Float(ComfyTypeIO):
    Type = float

    class Input(_NumberInput):
        pass


@comfytype(io_type="STRING")
class String(ComfyTypeIO):
    Type = str

    class Input(WidgetInput):
        def __init__(self, id: str, display_name: str | None = None, optional: bool = False,
                     tooltip: str | None = None, lazy: bool | None = None, multiline: bool = False,
                     placeholder: str | None = None, default: str | None = None, dynamic_prompts: bool | None = None,
                     socketless: bool | None = None, force_input: bool | None = None,
                     advanced: bool | None = None):
            super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, None, force_input)
            self.advanced = advanced
            self.multiline = multiline
            self.placeholder = placeholder
            self.dynamic_prompts = dynamic_prompts

        def as_dict(self) -> dict[str, Any]:
            return super().as_dict() | _pruned({"multiline": self.multiline, "placeholder": self.placeholder,
                                                "dynamicPrompts": self.dynamic_prompts})


@comfytype(io_type="COMBO")
class Combo(ComfyTypeIO):
    Type = str

    class Input(WidgetInput):
        def __init__(self, id: str, options: Any = None, display_name: str | None = None, optional: bool = False,
                     tooltip: str | None = None, lazy: bool | None = None, default: Any = None,
                     control_after_generate: bool | None = None, upload: UploadType | None = None,
                     image_folder: FolderType | None = None, remote: RemoteOptions | None = None,
                     socketless: bool | None = None, advanced: bool | None = None):
            if isinstance(options, type) and issubclass(options, Enum):
                options = [member.value for member in options]
            super().__init__(id, display_name, optional, tooltip, lazy,
                             default.value if isinstance(default, Enum) else default, socketless)
            self.options = list(options) if options is not None else None
            self.advanced = advanced
            self.multiselect = False
            self.control_after_generate = control_after_generate
            self.upload = upload
            self.image_folder = image_folder
            self.remote = remote

        def as_dict(self) -> dict[str, Any]:
            return super().as_dict() | _pruned({
                "multiselect": self.multiselect, "options": self.options,
                "control_after_generate": self.control_after_generate,
                **({self.upload.value: True} if self.upload is not None else {}),
                "image_folder": self.image_folder.value if self.image_folder is not None else None,
                "remote": self.remote.as_dict() if self.remote is not None else None})

    class Output(Output):
        def __init__(self, id: str | None = None, display_name: str | None = None, options: list[Any] | None = None,
                     tooltip: str | None = None, is_output_list: bool = False):
            super().__init__(id, display_name, tooltip, is_output_list)
            self.options = list(options or [])

        @property
        def io_type(self) -> Any:
            return self.options  # a combo output's type is its list of choices, as in V1


def _socket(name: str, io_type: str) -> type[ComfyTypeIO]:
    return comfytype(io_type)(type(name, (ComfyTypeIO,), {"__module__": __name__, "__qualname__": name}))


# Socket-only types (no widget): the value's shape is the one ComfyUI uses for that type name.
Image = _socket("Image", "IMAGE")
Mask = _socket("Mask", "MASK")
Latent = _socket("Latent", "LATENT")
Conditioning = _socket("Conditioning", "CONDITIONING")
Sampler = _socket("Sampler", "SAMPLER")
Sigmas = _socket("Sigmas", "SIGMAS")
Noise = _socket("Noise", "NOISE")
Guider = _socket("Guider", "GUIDER")
Clip = _socket("Clip", "CLIP")
ControlNet = _socket("ControlNet", "CONTROL_NET")
Vae = _socket("Vae", "VAE")
Model = _socket("Model", "MODEL")
ClipVision = _socket("ClipVision", "CLIP_VISION")
ClipVisionOutput = _socket("ClipVisionOutput", "CLIP_VISION_OUTPUT")
StyleModel = _socket("StyleModel", "STYLE_MODEL")
Gligen = _socket("Gligen", "GLIGEN")
UpscaleModel = _socket("UpscaleModel", "UPSCALE_MODEL")
Audio = _socket("Audio", "AUDIO")
Video = _socket("Video", "VIDEO")
Hooks = _socket("Hooks", "HOOKS")
HookKeyframes = _socket("HookKeyframes", "HOOK_KEYFRAMES")
TimestepsRange = _socket("TimestepsRange", "TIMESTEPS_RANGE")
LatentOperation = _socket("LatentOperation", "LATENT_OPERATION")
Photomaker = _socket("Photomaker", "PHOTOMAKER")
LoraModel = _socket("LoraModel", "LORA_MODEL")
ModelPatch = MODEL_PATCH = _socket("MODEL_PATCH", "MODEL_PATCH")
AnyType = _socket("AnyType", "*")
# Types of ComfyUI's newer models and of other packs: sockets only here (no node of ours makes these values).
WanCameraEmbedding = _socket("WanCameraEmbedding", "WAN_CAMERA_EMBEDDING")
SVG = _socket("SVG", "SVG")
LossMap = _socket("LossMap", "LOSS_MAP")
Voxel = _socket("Voxel", "VOXEL")
Mesh = _socket("Mesh", "MESH")
FlowControl = _socket("FlowControl", "FLOW_CONTROL")
Accumulation = _socket("Accumulation", "ACCUMULATION")
Load3DCamera = _socket("Load3DCamera", "LOAD3D_CAMERA")
Point = _socket("Point", "POINT")
FaceAnalysis = _socket("FaceAnalysis", "FACE_ANALYSIS")
BBOX = _socket("BBOX", "BBOX")
SEGS = _socket("SEGS", "SEGS")
AudioEncoder = _socket("AudioEncoder", "AUDIO_ENCODER")
AudioEncoderOutput = _socket("AudioEncoderOutput", "AUDIO_ENCODER_OUTPUT")
Tracks = _socket("Tracks", "TRACKS")
LatentUpscaleModel = _socket("LatentUpscaleModel", "LATENT_UPSCALE_MODEL")


class MultiType:
    """An input accepting several types (ComfyUI's comma-separated union); `id` may be a widget input, which then
    gives the widget."""

    io_type: ClassVar[str] = "COMFY_MULTITYPED_V3"

    class Input(Input):
        def __init__(self, id: str | Input, types: list[Any], display_name: str | None = None,
                     optional: bool = False, tooltip: str | None = None, lazy: bool | None = None,
                     extra_dict: dict[str, Any] | None = None):
            self.input_override = id if isinstance(id, Input) else None
            if isinstance(id, Input):
                optional = optional or id.optional
                tooltip = id.tooltip if id.tooltip is not None else tooltip
                display_name = id.display_name if id.display_name is not None else display_name
                lazy = id.lazy if id.lazy is not None else lazy
                id = id.id
            super().__init__(id, display_name, optional, tooltip, lazy, extra_dict)
            self.types = list(types)

        def get_io_type(self) -> str:
            names = [t.io_type for t in self.types]
            if self.input_override is not None:
                names.insert(0, self.input_override.get_io_type())
            return ",".join(dict.fromkeys(str(name) for name in names))

        def as_dict(self) -> dict[str, Any]:
            own = super().as_dict()
            return (self.input_override.as_dict() | own) if self.input_override is not None else own


# Hidden inputs, the schema, the node ------------------------------------------------------------------------------

class Hidden(StrEnum):
    """Values a node may ask for that are not inputs of the graph."""

    unique_id = "UNIQUE_ID"
    prompt = "PROMPT"
    extra_pnginfo = "EXTRA_PNGINFO"
    dynprompt = "DYNPROMPT"
    auth_token_comfy_org = "AUTH_TOKEN_COMFY_ORG"
    api_key_comfy_org = "API_KEY_COMFY_ORG"


class HiddenHolder:
    """`cls.hidden` while a V3 node runs: the hidden values it asked for, None for the others."""

    def __init__(self, values: dict[Hidden, Any] | None = None):
        for member in Hidden:
            setattr(self, member.name, (values or {}).get(member))

    def __getattr__(self, key: str) -> Any:
        return None

    @classmethod
    def from_dict(cls, values: dict[Any, Any] | None) -> HiddenHolder:
        return cls({Hidden(key): value for key, value in (values or {}).items()})


@dataclass
class Schema:
    node_id: str
    display_name: str | None = None
    category: str = "sd"
    inputs: list[Any] = field(default_factory=list)
    outputs: list[Any] = field(default_factory=list)
    hidden: list[Hidden] = field(default_factory=list)
    description: str = ""
    is_input_list: bool = False
    is_output_node: bool = False
    is_deprecated: bool = False
    is_experimental: bool = False
    is_api_node: bool = False
    not_idempotent: bool = False
    enable_expand: bool = False
    search_aliases: list[str] | None = None
    # Inputs the editor adds beyond the declared ones (image_3 ... image_N) reach execute; linked inputs do anyway.
    accept_all_inputs: bool = False

    def finalize(self) -> Schema:
        """Hidden values output / API nodes always get, and ids for outputs declared without one."""
        self.inputs, self.outputs, self.hidden = list(self.inputs or []), list(self.outputs or []), \
            list(self.hidden or [])
        implied = ([Hidden.prompt, Hidden.extra_pnginfo] if self.is_output_node else []) + \
            ([Hidden.auth_token_comfy_org, Hidden.api_key_comfy_org] if self.is_api_node else [])
        self.hidden += [kind for kind in implied if kind not in self.hidden]
        for index, output in enumerate(self.outputs):
            if output.id is None:
                output.id = f"_{index}_{output.io_type}_"
        return self

    def validate(self) -> None:
        """Input and output ids must be unique, together."""
        ids = [item.id for item in self.inputs] + [item.id for item in self.outputs]
        repeated = sorted({str(name) for name in ids if ids.count(name) > 1})
        if repeated:
            raise ValueError(f"schema of {self.node_id}: ids must be unique across inputs and outputs, but "
                             f"{', '.join(repeated)} repeat")


class NodeOutput:
    """What `execute` returns: the output values, and optionally UI data, a graph to expand, or a blocker."""

    def __init__(self, *args: Any, ui: Any = None, expand: dict[str, Any] | None = None,
                 block_execution: str | None = None):
        self.args = args
        self.ui = ui
        self.expand = expand
        self.block_execution = block_execution

    @property
    def result(self) -> tuple[Any, ...] | None:
        return self.args if self.args else None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NodeOutput:
        result = data.get("result")
        if isinstance(result, ExecutionBlocker):
            return cls(block_execution=result.message)
        return cls(*(result or ()), ui=data.get("ui"), expand=data.get("expand"))

    def __getitem__(self, index: int) -> Any:
        return self.args[index]


class _UIOutput:
    def as_dict(self) -> dict[str, Any]:
        raise NotImplementedError


class ComfyNode:
    """Base of V3 nodes: everything is a classmethod; `hidden` is set on a per-call subclass while it runs."""

    hidden: ClassVar[HiddenHolder | None] = None

    @classmethod
    def define_schema(cls) -> Schema:
        raise NotImplementedError(f"{cls.__name__} defines no define_schema()")

    @classmethod
    def execute(cls, **kwargs: Any) -> Any:
        raise NotImplementedError(f"{cls.__name__} defines no execute()")

    @classmethod
    def validate_inputs(cls, **kwargs: Any) -> bool | str:
        raise NotImplementedError

    @classmethod
    def fingerprint_inputs(cls, **kwargs: Any) -> Any:
        raise NotImplementedError

    @classmethod
    def check_lazy_status(cls, **kwargs: Any) -> list[str]:
        return [name for name, value in kwargs.items() if value is None]

    @classmethod
    def GET_SCHEMA(cls) -> Schema:  # noqa: N802 - ComfyUI's name
        schema = cls.define_schema().finalize()
        schema.validate()
        return schema


class MatchType:
    """Inputs and outputs that share one type, chosen by what is linked (a `Template` with the allowed types).
    The editor narrows the sockets; here each is the union of the template's allowed types ("*" for any), so
    validation accepts what ComfyUI's backend accepts."""

    io_type: ClassVar[str] = "COMFY_MATCHTYPE_V3"

    class Template:
        def __init__(self, template_id: str, allowed_types: Any = None):
            self.template_id = template_id
            allowed = allowed_types if allowed_types is not None else AnyType
            self.allowed_types = list(allowed) if isinstance(allowed, (list, tuple)) else [allowed]

        def io_type(self) -> str:
            names = [str(t.io_type) for t in self.allowed_types]
            return "*" if "*" in names else ",".join(dict.fromkeys(names))

    class Input(Input):
        def __init__(self, id: str, template: MatchType.Template, display_name: str | None = None,
                     optional: bool = False, tooltip: str | None = None, lazy: bool | None = None,
                     extra_dict: dict[str, Any] | None = None, advanced: bool | None = None):
            super().__init__(id, display_name, optional, tooltip, lazy, extra_dict, advanced)
            self.template = template

        def get_io_type(self) -> str:
            return self.template.io_type()

    class Output(Output):
        def __init__(self, template: MatchType.Template, id: str | None = None, display_name: str | None = None,
                     tooltip: str | None = None, is_output_list: bool = False):
            super().__init__(id, display_name, tooltip, is_output_list)
            self.template = template

        @property
        def io_type(self) -> str:
            return self.template.io_type()


# The dynamic inputs and the bounding box widget live in a module of their own (they build on the classes above).
from ._dynamic import Autogrow, BoundingBox, DynamicCombo, DynamicInput, create_input_dict_v1  # noqa: E402

__all__ = ["AnyType", "Audio", "Autogrow", "Boolean", "BoundingBox", "DynamicCombo", "DynamicInput",
           "create_input_dict_v1", "Clip", "ClipVision", "ClipVisionOutput", "Combo", "ComfyNode",
           "ComfyTypeI", "ComfyTypeIO", "Conditioning", "ControlNet", "Custom", "Float", "FolderType", "Gligen",
           "Guider", "Hidden", "HiddenHolder", "HookKeyframes", "Hooks", "Image", "Input", "Int", "Latent",
           "LatentOperation", "LoraModel", "MODEL_PATCH", "Mask", "MatchType", "Model", "MultiType", "Noise",
           "NodeOutput",
           "NumberDisplay", "Output", "Photomaker", "RemoteOptions", "Sampler", "Schema", "Sigmas", "String",
           "StyleModel", "TimestepsRange", "UploadType", "UpscaleModel", "Vae", "Video", "WidgetInput",
           "comfytype"]
