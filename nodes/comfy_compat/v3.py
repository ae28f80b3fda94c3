"""ComfyUI V3 nodes (`comfy_api.latest.io.ComfyNode`) as ordinary latentloom nodes.

A V3 pack's `comfy_entrypoint()` (sync or async) returns a `ComfyExtension`; `get_node_list()` gives its node
classes. Each class is described to v1.py as the V1 class ComfyUI itself derives from a schema: INPUT_TYPES
(combos as choice lists, so they are checked), RETURN_TYPES / RETURN_NAMES / OUTPUT_IS_LIST / OUTPUT_TOOLTIPS,
the flags, and the hooks that the V3 class really overrides (validate_inputs -> VALIDATE_INPUTS,
fingerprint_inputs -> IS_CHANGED, check_lazy_status). So validation, caching, lazy inputs, lists and results go
through the one adapter. What is V3's own happens here: the hidden values a schema asks for are taken out of the
keyword arguments and given as `cls.hidden` on a per-call subclass (ComfyUI's class clone), and `NodeOutput`
(values, `ui` objects or dicts, `expand`, `block_execution`) becomes V1's result dict.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from latentloom.engine.node import ExecutionBlocker, Node

from .comfy_api.latest import ComfyExtension
from .comfy_api.latest._io import ComfyNode, Hidden, HiddenHolder, NodeOutput, Schema
from .internals import is_placeholder
from .v1 import adapt_v1, run_awaitable
from .v3_dynamic import dynamic_problems, flatten, has_dynamic_parts, nest_inputs


def _resolved(value: Any) -> Any:
    return run_awaitable(value) if inspect.isawaitable(value) else value


def adapt_extension(entrypoint: Any, pack: str) -> list[type[Node]]:
    """The nodes of a V3 pack, from its comfy_entrypoint."""
    if not callable(entrypoint):
        raise TypeError(f"comfy_entrypoint of custom node pack '{pack}' is not callable")
    extension = _resolved(entrypoint())
    if not isinstance(extension, ComfyExtension):
        raise TypeError(f"comfy_entrypoint of custom node pack '{pack}' returned {type(extension).__name__}, not a "
                        "ComfyExtension")
    _resolved(extension.on_load())
    node_list = _resolved(extension.get_node_list())
    if not isinstance(node_list, list):
        raise TypeError(f"get_node_list() of custom node pack '{pack}' returned {type(node_list).__name__}, not a "
                        "list")
    return [adapt_v3(node_cls) for node_cls in node_list]


def is_v3_class(value: Any) -> bool:
    """An io.ComfyNode subclass with a schema of its own: a stand-in for one of ComfyUI's nodes (internals.py)
    is not, and neither is a V1 class derived from one."""
    if not (isinstance(value, type) and issubclass(value, ComfyNode)) or is_placeholder(value):
        return False
    return not hasattr(value, "latentloom_missing") or _overrides(value, "define_schema")


def adapt_v3(node_cls: Any, type_name: str | None = None, display_name: str | None = None) -> type[Node]:
    """A Node class for a V3 class, named by its schema's node id, or by `type_name` when a pack lists the class
    in NODE_CLASS_MAPPINGS (ComfyUI accepts V3 classes there, under the mapping key). Never raises: a broken
    schema is reported when the registry reads the inputs (as v1.py does), under the class name when even the
    node id is unknown."""
    try:
        if not is_v3_class(node_cls):
            raise TypeError(f"{node_cls!r} is not an io.ComfyNode subclass")
        schema = node_cls.GET_SCHEMA()
        return adapt_v1(type_name or schema.node_id, v1_facade(node_cls, schema),
                        display_name or schema.display_name)
    except Exception as exc:
        name = type_name or str(getattr(node_cls, "__name__", repr(node_cls)))
        return adapt_v1(name, _broken_facade(name, exc))


def _overrides(node_cls: type[ComfyNode], name: str) -> bool:
    own = getattr(node_cls, name)
    return getattr(own, "__func__", own) is not getattr(ComfyNode.__dict__[name], "__func__", None)


def v1_inputs(schema: Schema) -> dict[str, dict[str, Any]]:
    """INPUT_TYPES for a finalized schema (dynamic inputs as their flat parts: v3_dynamic.py)."""
    declared = flatten(schema.inputs).sections
    if schema.hidden:
        declared["hidden"] = {kind.name: (kind.value,) for kind in schema.hidden}
    return declared


def _with_hidden(node_cls: type[ComfyNode], schema: Schema, kwargs: dict[str, Any]) -> type[ComfyNode]:
    """A subclass whose `hidden` holds the hidden values, which are removed from kwargs."""
    values: dict[Hidden, Any] = {}
    for kind in schema.hidden:
        if kind.name in kwargs:
            value = kwargs.pop(kind.name)
            values[kind] = value[0] if schema.is_input_list and isinstance(value, list) and value else value
    return type(node_cls.__name__, (node_cls,), {"hidden": HiddenHolder(values), "__module__": node_cls.__module__})


def v1_result(node_cls: type[ComfyNode], schema: Schema, result: Any) -> Any:
    """A V3 return value in V1's shape."""
    if result is None:
        return ()
    if isinstance(result, dict):
        result = NodeOutput.from_dict(result)
    if isinstance(result, ExecutionBlocker):
        result = NodeOutput(block_execution=result.message)
    if isinstance(result, tuple):
        return result
    if not isinstance(result, NodeOutput):
        raise TypeError(f"{node_cls.__name__}.execute returned {type(result).__name__}, not an io.NodeOutput")
    if result.expand is not None and not schema.enable_expand:
        raise TypeError(f"{node_cls.__name__} returned a graph to expand but its schema does not set "
                        "enable_expand=True")
    values: tuple[Any, ...] | None = result.result
    if result.block_execution is not None:
        values = tuple(ExecutionBlocker(result.block_execution) for _ in schema.outputs)
    ui = result.ui.as_dict() if hasattr(result.ui, "as_dict") else result.ui
    return {"result": values, "ui": ui, "expand": result.expand}


def _hook(node_cls: type[ComfyNode], schema: Schema, name: str, convert: Callable[[Any], Any] | None = None) -> Any:
    """A V1-side function calling the V3 classmethod `name` on a class with `hidden` set, keeping its signature
    (v1.py reads it: the inputs VALIDATE_INPUTS names) and whether it is async. The flat parts of dynamic inputs
    are gathered into their dicts first."""
    method = getattr(node_cls, name)
    finish = convert or (lambda value: value)
    dynamic = has_dynamic_parts(schema.inputs)

    def arguments(kwargs: dict[str, Any]) -> dict[str, Any]:
        return nest_inputs(schema.inputs, kwargs) if dynamic else kwargs

    if inspect.iscoroutinefunction(method):
        async def call_async(*args: Any, **kwargs: Any) -> Any:
            v3_cls = _with_hidden(node_cls, schema, kwargs)
            return finish(await getattr(v3_cls, name)(*args, **arguments(kwargs)))
        call: Callable[..., Any] = call_async
    else:
        def call_sync(*args: Any, **kwargs: Any) -> Any:
            v3_cls = _with_hidden(node_cls, schema, kwargs)
            return finish(getattr(v3_cls, name)(*args, **arguments(kwargs)))
        call = call_sync
    call.__signature__ = inspect.signature(method)  # type: ignore[attr-defined]
    return staticmethod(call)


def v1_facade(node_cls: type[ComfyNode], schema: Schema) -> type:
    """The V1 class ComfyUI derives from a V3 class and its schema."""
    outputs = schema.outputs

    def input_types(cls: type) -> dict[str, dict[str, Any]]:
        return v1_inputs(node_cls.GET_SCHEMA())  # re-read each time: combo choices may be file lists

    namespace: dict[str, Any] = {
        "__module__": node_cls.__module__, "__doc__": node_cls.__doc__, "comfy_v3_class": node_cls,
        "INPUT_TYPES": classmethod(input_types), "FUNCTION": "execute",
        "execute": _hook(node_cls, schema, "execute", lambda result: v1_result(node_cls, schema, result)),
        "RETURN_TYPES": tuple(item.io_type for item in outputs),
        "RETURN_NAMES": tuple(item.display_name or item.io_type for item in outputs),
        "OUTPUT_IS_LIST": tuple(bool(item.is_output_list) for item in outputs),
        "OUTPUT_TOOLTIPS": tuple(item.tooltip for item in outputs),
        "CATEGORY": schema.category, "DESCRIPTION": schema.description, "OUTPUT_NODE": schema.is_output_node,
        "INPUT_IS_LIST": schema.is_input_list, "DEPRECATED": schema.is_deprecated,
        "EXPERIMENTAL": schema.is_experimental, "NOT_IDEMPOTENT": schema.not_idempotent,
    }
    for v3_name, v1_name in (("validate_inputs", "VALIDATE_INPUTS"), ("fingerprint_inputs", "IS_CHANGED"),
                             ("check_lazy_status", "check_lazy_status")):
        if _overrides(node_cls, v3_name):
            namespace[v1_name] = _hook(node_cls, schema, v3_name)
    if has_dynamic_parts(schema.inputs):
        namespace.update(_dynamic_validation(node_cls, schema, namespace.get("VALIDATE_INPUTS")))
    return type(node_cls.__name__, (), namespace)


def _dynamic_validation(node_cls: type[ComfyNode], schema: Schema, own: Any) -> dict[str, Any]:
    """VALIDATE_INPUTS for a schema with dynamic inputs: what depends on the selected options first
    (v3_dynamic.dynamic_problems), then the node's own validate_inputs with the inputs it names (a dynamic input
    as its dict). `comfy_unchecked_inputs` tells v1.py which inputs the engine leaves to it."""
    flat = flatten(schema.inputs)
    own_params: tuple[str, ...] | None = ()
    if own is not None:
        parameters = inspect.signature(own.__func__).parameters.values()
        takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
        own_params = None if takes_all else tuple(p.name for p in parameters)
    # The parts of a dynamic input keep the engine's checks even when validate_inputs names the input.
    unchecked = None if own_params is None else (*own_params, *sorted(flat.varying))

    def validate(**kwargs: Any) -> Any:
        input_types = kwargs.pop("input_types", None) or {}
        linked = set(input_types)
        constants = {key: value for key, value in kwargs.items() if key not in linked}
        problems = dynamic_problems(schema.inputs, constants, linked, flat.varying)
        if problems:
            return problems
        if own is None:
            return True
        arguments = kwargs if own_params is None else \
            {key: value for key, value in kwargs.items() if key.split(".")[0] in own_params}
        if own_params is None or "input_types" in own_params:
            arguments["input_types"] = input_types
        verdict = own.__func__(**arguments)
        return run_awaitable(verdict) if inspect.isawaitable(verdict) else verdict

    return {"VALIDATE_INPUTS": staticmethod(validate), "comfy_unchecked_inputs": unchecked}


def _broken_facade(name: str, problem: Exception) -> type:
    """A V1 class that reports `problem` when its inputs are read."""
    def input_types(cls: type) -> Any:
        raise problem

    def never_called(self: Any, **kwargs: Any) -> Any:
        raise problem

    return type(name, (), {"INPUT_TYPES": classmethod(input_types), "FUNCTION": "execute", "execute": never_called})


__all__ = ["adapt_extension", "adapt_v3", "v1_facade", "v1_inputs"]
