"""ComfyUI V1 node classes as ordinary latentloom nodes.

`adapt_v1(type_name, comfy_cls, display_name)` generates a `Node` subclass that declares the V1 class's inputs
(INPUT_TYPES: required / optional widgets and sockets, combo lists, custom socket types, "*"), outputs
(RETURN_TYPES / RETURN_NAMES / OUTPUT_IS_LIST / OUTPUT_TOOLTIPS) and flags, and maps the V1 hooks onto the node
protocol: IS_CHANGED -> `fingerprint` (part of the cache key; NaN or an error means never cached, as in ComfyUI),
VALIDATE_INPUTS -> `validate_inputs` (the inputs it names skip the range / choice checks; taking `input_types`
skips the link type check), check_lazy_status -> `inputs_needed`, INPUT_IS_LIST -> `input_is_list`. The inputs
are not pydantic fields (V1 input names may be any string, `description` or `run` included): the executor's
`model_construct` keeps them as extras, and `run` passes them to FUNCTION with the hidden values added.

Problems in a V1 declaration surface when the registry asks for the node's inputs, so one broken class is
reported on its own and the rest of its pack still loads.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import Awaitable, Iterable
from typing import Any, ClassVar

from latentloom.engine.environment import Environment
from latentloom.engine.node import ExecutionBlocker, Node, NodeOutput, RunContext
from latentloom.engine.types import BOOLEAN, COMBO, FLOAT, INT, STRING, InputSpec, ListedAs, Output

from .context import acting_for
from .model_objects import engine_value, pack_view

HIDDEN_KINDS = ("PROMPT", "DYNPROMPT", "EXTRA_PNGINFO", "UNIQUE_ID", "AUTH_TOKEN_COMFY_ORG", "API_KEY_COMFY_ORG")
# Options the V3 adapter puts on the flat inputs of dynamic inputs (v3_dynamic.py): the catalogue entry an input
# is listed as, (entry, optional), and "not listed" for the parts it stands for.
LISTED_AS_OPTION = "latentloom_listed_as"
UNLISTED_OPTION = "latentloom_unlisted"
# Input options with a field of their own in InputSpec; any other option passes through to the catalogue.
CONSUMED_OPTIONS = frozenset({"default", "min", "max", "step", "round", "multiline", "tooltip", "forceInput", "lazy",
                              "rawLink", LISTED_AS_OPTION, UNLISTED_OPTION})


class DynamicPromptView:
    """What ComfyUI hands a node for a hidden DYNPROMPT: read access to the running graph."""

    def __init__(self, prompt: dict[str, Any]):
        self._prompt = prompt

    def get_node(self, node_id: str) -> dict[str, Any]:
        if node_id not in self._prompt:
            raise KeyError(f"node {node_id} is not in the prompt")
        return self._prompt[node_id]

    def has_node(self, node_id: str) -> bool:
        return node_id in self._prompt

    def all_node_ids(self) -> list[str]:
        return list(self._prompt)

    def get_original_prompt(self) -> dict[str, Any]:
        return self._prompt


def run_awaitable(value: Awaitable[Any]) -> Any:
    """The result of an awaitable from sync code (an async VALIDATE_INPUTS / IS_CHANGED), even inside a loop."""
    async def wait() -> Any:
        return await value

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(wait())
    box: dict[str, Any] = {}

    def in_thread() -> None:
        try:
            box["value"] = asyncio.run(wait())
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


class ComfyV1Node(Node):
    """Base of the generated classes; the class variables below are filled per V1 class."""

    category = "sd"
    version = "comfy-v1"
    comfy_class: ClassVar[Any]  # the V1 class (any attributes)
    comfy_function: ClassVar[str] = ""
    # Why the V1 class cannot be used (reported when the registry reads its inputs), or None.
    comfy_problem: ClassVar[str | None] = None
    comfy_hidden: ClassVar[dict[str, str]] = {}
    # The parameters of VALIDATE_INPUTS (None: it takes **kwargs, so it gets everything).
    comfy_validator_params: ClassVar[tuple[str, ...] | None] = ()
    # The inputs VALIDATE_INPUTS checks itself, so the engine does not (None: all). Its parameters, unless the
    # class says otherwise (`comfy_unchecked_inputs`, set by the V3 adapter).
    comfy_unchecked_params: ClassVar[tuple[str, ...] | None] = ()

    # Declaration ----------------------------------------------------------------------------------------------

    @classmethod
    def input_specs(cls) -> dict[str, InputSpec]:
        cached: dict[str, InputSpec] | None = cls.__dict__.get("_input_specs_cache")
        if cached is not None:
            return cached
        if cls.comfy_problem:
            raise TypeError(cls.comfy_problem)
        specs, defaults = parse_input_types(cls)
        type.__setattr__(cls, "_input_specs_cache", specs)
        type.__setattr__(cls, "_input_defaults", defaults)
        return specs

    @classmethod
    def input_default(cls, name: str) -> Any:
        cls.input_specs()
        defaults: dict[str, Any] = cls.__dict__.get("_input_defaults", {})
        return defaults.get(name)

    # Calls ----------------------------------------------------------------------------------------------------

    def comfy_inputs(self, ctx: RunContext) -> dict[str, Any]:
        """FUNCTION's keyword arguments: the inputs given, None for unevaluated lazy links, the hidden values."""
        cls = type(self)
        as_list = cls.input_is_list
        kwargs = {name: pack_view(value) for name, value in (self.__pydantic_extra__ or {}).items()}
        linked = (ctx.prompt.get(ctx.node_id) or {}).get("inputs", {}) if isinstance(ctx.prompt, dict) else {}
        for name, spec in cls.input_specs().items():
            if spec.lazy and name not in kwargs and (not spec.optional or name in linked):
                kwargs[name] = [None] if as_list else None
        values = {"PROMPT": ctx.prompt, "UNIQUE_ID": ctx.node_id, "DYNPROMPT": DynamicPromptView(ctx.prompt),
                  "EXTRA_PNGINFO": ctx.extra_data.get("extra_pnginfo"),
                  "AUTH_TOKEN_COMFY_ORG": ctx.extra_data.get("auth_token_comfy_org"),
                  "API_KEY_COMFY_ORG": ctx.extra_data.get("api_key_comfy_org")}
        for name, kind in cls.comfy_hidden.items():
            if kind in values:
                kwargs[name] = [values[kind]] if as_list else values[kind]
        return kwargs

    def run(self, ctx: RunContext) -> Any:
        cls = type(self)
        kwargs = self.comfy_inputs(ctx)
        with acting_for(ctx.env, ctx):
            result = getattr(cls.comfy_class(), cls.comfy_function)(**kwargs)
        return v1_result(result)

    def inputs_needed(self, ctx: RunContext, available: set[str]) -> Any:
        cls = type(self)
        kwargs = self.comfy_inputs(ctx)
        check = cls.comfy_class().check_lazy_status
        if inspect.iscoroutinefunction(check):
            async def needed() -> list[str]:
                with acting_for(ctx.env, ctx):
                    return list(await check(**kwargs) or [])
            return needed()
        with acting_for(ctx.env, ctx):
            return list(check(**kwargs) or [])

    @classmethod
    def comfy_fingerprint(cls, env: Environment, constants: dict[str, Any]) -> Any:
        """IS_CHANGED with the constants (linked required inputs as None). Raising means "changed": NaN, so the
        node is never served from the cache, as ComfyUI does."""
        args = dict(constants)
        for name, spec in cls.input_specs().items():
            if not spec.optional and name not in args:
                args[name] = None
        try:
            with acting_for(env):
                value = cls.comfy_class.IS_CHANGED(**args)
                if inspect.isawaitable(value):
                    value = run_awaitable(value)
        except Exception:
            return float("nan")
        return value

    @classmethod
    def comfy_validate(cls, env: Environment, constants: dict[str, Any], input_types: dict[str, str]) -> Any:
        """VALIDATE_INPUTS with the inputs it names (linked ones as None), plus input_types when it asks."""
        available = {**constants, **{name: None for name in input_types if name not in constants}}
        params = cls.comfy_validator_params
        args = dict(available) if params is None else {k: available[k] for k in params if k in available}
        if params is None or "input_types" in params:
            args["input_types"] = input_types
        with acting_for(env):
            verdict = cls.comfy_class.VALIDATE_INPUTS(**args)
            if inspect.isawaitable(verdict):
                verdict = run_awaitable(verdict)
        if verdict is True or isinstance(verdict, (str, dict)):
            return verdict
        return False


class AsyncComfyV1Node(ComfyV1Node):
    """For V1 classes whose FUNCTION is `async def`: the executor runs them as tasks."""

    async def run(self, ctx: RunContext) -> Any:  # type: ignore[override]
        cls = type(self)
        kwargs = self.comfy_inputs(ctx)
        with acting_for(ctx.env, ctx):
            result = await getattr(cls.comfy_class(), cls.comfy_function)(**kwargs)
        return v1_result(result)


def v1_result(result: Any) -> Any:
    """A V1 return value as the executor takes it: a tuple, a NodeOutput, a blocker or None."""
    if isinstance(result, dict) and set(result) <= {"result", "ui", "expand"}:
        values = result.get("result")
        values = tuple(engine_value(v) for v in values) if isinstance(values, (list, tuple)) else values
        ui = result.get("ui")
        if isinstance(ui, dict):  # ComfyUI flattens each ui entry, so a tuple ({"text": (t,)}) is a list too
            ui = {key: list(value) if isinstance(value, tuple) else value for key, value in ui.items()}
        return NodeOutput(values=tuple(values) if values is not None else (), ui=ui, expand=result.get("expand"))
    if isinstance(result, (list, tuple)):
        return tuple(engine_value(value) for value in result)  # MODEL / CLIP / VAE views back to our objects
    return result


def _validator_params(comfy_cls: type) -> tuple[str, ...] | None:
    signature = inspect.signature(comfy_cls.VALIDATE_INPUTS)  # type: ignore[attr-defined]
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()):
        return None
    return tuple(signature.parameters)


def adapt_v1(type_name: str, comfy_cls: Any, display_name: str | None = None) -> type[Node]:
    """A Node class for a V1 class registered as `type_name`. Never raises: problems are reported when the
    registry reads the inputs (see the module docstring)."""
    namespace: dict[str, Any] = {"__module__": __name__, "type_name": type_name, "comfy_class": comfy_cls,
                                 "display_name": display_name or type_name}
    base: type[ComfyV1Node] = ComfyV1Node
    try:
        if not isinstance(comfy_cls, type):
            raise TypeError(f"NODE_CLASS_MAPPINGS['{type_name}'] is not a class")
        function = getattr(comfy_cls, "FUNCTION", None)
        if not isinstance(function, str) or not callable(getattr(comfy_cls, function, None)):
            raise TypeError(f"{comfy_cls.__name__}.FUNCTION must name one of its methods (got {function!r})")
        if inspect.iscoroutinefunction(getattr(comfy_cls, function)):
            base = AsyncComfyV1Node
        namespace.update(_describe(comfy_cls, function))
        if callable(getattr(comfy_cls, "VALIDATE_INPUTS", None)):
            params = _validator_params(comfy_cls)
            unchecked = getattr(comfy_cls, "comfy_unchecked_inputs", params)
            namespace["comfy_validator_params"] = params
            namespace["comfy_unchecked_params"] = unchecked
            namespace["checks_input_types"] = unchecked is None or "input_types" in unchecked
            namespace["validate_inputs"] = classmethod(_call_validate)
        if callable(getattr(comfy_cls, "IS_CHANGED", None)):
            namespace["fingerprint"] = classmethod(_call_fingerprint)
        if not callable(getattr(comfy_cls, "check_lazy_status", None)):
            namespace["inputs_needed"] = Node.inputs_needed
    except Exception as exc:
        namespace["comfy_problem"] = f"{type(exc).__name__}: {exc}"
    ident = "".join(ch if ch.isalnum() else "_" for ch in type_name)
    return type(f"ComfyV1_{ident}", (base,), namespace)


# Named functions (not lambdas) so the validator sees an override of Node.validate_inputs.
def _call_validate(cls: type[ComfyV1Node], env: Environment, constants: dict[str, Any],
                   input_types: dict[str, str]) -> Any:
    return cls.comfy_validate(env, constants, input_types)


def _call_fingerprint(cls: type[ComfyV1Node], env: Environment, constants: dict[str, Any]) -> Any:
    return cls.comfy_fingerprint(env, constants)


def _describe(comfy_cls: type, function: str) -> dict[str, Any]:
    """The class variables of the generated node from the V1 class attributes."""
    return_types = tuple(getattr(comfy_cls, "RETURN_TYPES", ()) or ())
    names = tuple(getattr(comfy_cls, "RETURN_NAMES", None) or ())
    is_list = getattr(comfy_cls, "OUTPUT_IS_LIST", None) or ()
    tooltips = tuple(getattr(comfy_cls, "OUTPUT_TOOLTIPS", None) or ())
    outputs = []
    for index, kind in enumerate(return_types):
        type_name = COMBO if isinstance(kind, (list, tuple)) else str(kind)
        name = str(names[index]) if index < len(names) and names[index] else None
        outputs.append(Output(type_name, name=name, is_list=bool(is_list[index]) if index < len(is_list) else False,
                              tooltip=tooltips[index] if index < len(tooltips) else None))
    hidden_section = _input_types(comfy_cls).get("hidden") or {}
    hidden = {str(name): str(kind[0] if isinstance(kind, (list, tuple)) else kind)
              for name, kind in hidden_section.items()}
    return {"comfy_function": function, "outputs": tuple(outputs), "comfy_hidden": hidden,
            "category": str(getattr(comfy_cls, "CATEGORY", "sd") or "sd"),
            "description": str(getattr(comfy_cls, "DESCRIPTION", "") or ""),
            "output_node": bool(getattr(comfy_cls, "OUTPUT_NODE", False)),
            "input_is_list": bool(getattr(comfy_cls, "INPUT_IS_LIST", False)),
            "deprecated": bool(getattr(comfy_cls, "DEPRECATED", False)),
            "experimental": bool(getattr(comfy_cls, "EXPERIMENTAL", False))}


def _input_types(comfy_cls: Any) -> dict[str, Any]:
    declared = comfy_cls.INPUT_TYPES()
    if not isinstance(declared, dict):
        raise TypeError(f"{comfy_cls.__name__}.INPUT_TYPES() returned {type(declared).__name__}, not a dict")
    return declared


def parse_input_types(cls: type[ComfyV1Node]) -> tuple[dict[str, InputSpec], dict[str, Any]]:
    """InputSpecs and widget defaults from INPUT_TYPES (read once; combo choices are re-read on each use)."""
    declared = _input_types(cls.comfy_class)
    params = cls.comfy_unchecked_params
    unchecked_all = params is None
    specs: dict[str, InputSpec] = {}
    defaults: dict[str, Any] = {}
    for section in ("required", "optional"):
        entries = declared.get(section) or {}
        if not isinstance(entries, dict):
            raise TypeError(f"INPUT_TYPES()['{section}'] is not a dict")
        for name, entry in entries.items():
            unchecked = unchecked_all or name in (params or ())
            specs[name], defaults[name] = input_spec(cls.comfy_class, section, str(name), entry, unchecked)
    return specs, defaults


def _combo_choices(comfy_cls: Any, section: str, name: str, loaded: list[Any]) -> Any:
    """Combo choices read from INPUT_TYPES each time (file lists change), the loaded ones if that fails."""
    def choices(env: Any) -> list[Any]:
        try:
            with acting_for(env if isinstance(env, Environment) else None):
                kind = _input_types(comfy_cls)[section][name][0]
            return list(kind) if isinstance(kind, (list, tuple)) else loaded
        except Exception:
            return loaded
    return choices


def input_spec(comfy_cls: Any, section: str, name: str, entry: Any, unchecked: bool) -> tuple[InputSpec, Any]:
    """One V1 input entry, `(TYPE, {options})`, as an InputSpec and its default."""
    if isinstance(entry, str):
        entry = (entry,)
    if not isinstance(entry, (list, tuple)) or not entry:
        raise TypeError(f"input '{name}': expected (TYPE, options), got {entry!r}")
    kind = entry[0]
    options: dict[str, Any] = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
    extra = {key: value for key, value in options.items() if key not in CONSUMED_OPTIONS}
    listed_as = options.get(LISTED_AS_OPTION)
    common: dict[str, Any] = {"optional": section == "optional", "tooltip": options.get("tooltip"),
                              "lazy": bool(options.get("lazy")), "raw_link": bool(options.get("rawLink")),
                              "extra": extra, "listed": not options.get(UNLISTED_OPTION),
                              "listed_as": ListedAs(*listed_as) if listed_as is not None else None}
    default = options.get("default")
    if isinstance(kind, (list, tuple)):
        loaded = list(kind)
        if default is None and loaded:
            default = loaded[0]
        return InputSpec(COMBO, choices=_combo_choices(comfy_cls, section, name, loaded), check_value=not unchecked,
                         **common), default
    kind = str(kind)
    if kind == COMBO:
        # The V2 form ["COMBO", {"options": [...]}]: ComfyUI does not check the value against the options.
        return InputSpec(COMBO, check_value=False, **common), default
    force_input = bool(options.get("forceInput"))
    if kind in (INT, FLOAT):
        return InputSpec(kind, min=options.get("min"), max=options.get("max"), step=options.get("step"),
                         round=options.get("round") if kind == FLOAT else None, force_input=force_input,
                         check_value=not unchecked, **common), default
    if kind == STRING:
        return InputSpec(STRING, multiline=bool(options.get("multiline")), force_input=force_input,
                         **common), default
    if kind == BOOLEAN:
        return InputSpec(BOOLEAN, force_input=force_input, **common), default
    return InputSpec(kind, force_input=force_input, **common), default  # forceInput kept for the editor


def adapt_mappings(mappings: dict[str, Any], display_names: dict[str, Any] | None) -> Iterable[type[Node]]:
    """Node classes for a pack's NODE_CLASS_MAPPINGS (display names from NODE_DISPLAY_NAME_MAPPINGS)."""
    names = display_names if isinstance(display_names, dict) else {}
    for type_name, comfy_cls in mappings.items():
        display = names.get(type_name)
        yield adapt_v1(str(type_name), comfy_cls, str(display) if display else None)


__all__ = ["ComfyV1Node", "DynamicPromptView", "ExecutionBlocker", "adapt_mappings", "adapt_v1"]
